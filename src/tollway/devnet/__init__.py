"""Local EVM devnet helpers: run anvil and deploy the TestUSDC (EIP-3009) token.

* :mod:`tollway.devnet.anvil` - locate / start an anvil node, well-known dev keys.
* :mod:`tollway.devnet.deploy` - deploy (or re-attach to) TestUSDC, the :class:`Devnet` record.
"""
