// SPDX-License-Identifier: MIT
pragma solidity ^0.8.28;

/// @dev EIP-3009 `receiveWithAuthorization`, in USDC's two forms (v,r,s and, since USDC v2.2, bytes for
///      smart-wallet signatures), and the ERC-20 transfer.
interface IERC3009Receive {
    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external;

    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes calldata signature
    ) external;
}

/// @title x402 batch-settlement ERC-3009 deposit collector for the tollway devnet
/// @notice Pulls a channel deposit from the payer with an EIP-3009 `ReceiveWithAuthorization` the
///         payer signed for `to` = this contract, then hands it to the batch-settlement escrow. The
///         authorization's nonce is `keccak256(abi.encode(channelId, salt))`, so the signature binds
///         the deposit to one channel: the escrow's `deposit` is the only way in.
/// @dev `collectorData` = `abi.encode(uint256 validAfter, uint256 validBefore, uint256 salt, bytes signature)`
///      (the x402 SDK's `build_erc3009_collector_data`). A 65-byte signature goes to the token's
///      (v,r,s) form, anything else to its bytes form. Written from the x402 spec and SDK; placed at
///      0x4020806089470a89826cB9fB1f4059150b550004 with `anvil_setCode` (no constructor, no
///      immutables, no storage). NOT for production.
contract ERC3009DepositCollector {
    /// @notice The batch-settlement escrow: the only caller, and where every deposit goes.
    address public constant BATCH_SETTLEMENT = 0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003;

    error OnlyBatchSettlement();
    error TransferFailed();

    /// @notice Move `amount` of `token` from `payer` to the escrow, on the payer's authorization for
    ///         the channel `channelId` carried in `data`.
    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata data) external {
        if (msg.sender != BATCH_SETTLEMENT) revert OnlyBatchSettlement();
        (uint256 validAfter, uint256 validBefore, uint256 salt, bytes memory signature) =
            abi.decode(data, (uint256, uint256, uint256, bytes));
        bytes32 nonce = keccak256(abi.encode(channelId, salt));
        if (signature.length == 65) {
            bytes32 r;
            bytes32 s;
            uint8 v;
            assembly ("memory-safe") {
                r := mload(add(signature, 32))
                s := mload(add(signature, 64))
                v := byte(0, mload(add(signature, 96)))
            }
            IERC3009Receive(token).receiveWithAuthorization(
                payer, address(this), amount, validAfter, validBefore, nonce, v, r, s
            );
        } else {
            IERC3009Receive(token).receiveWithAuthorization(
                payer, address(this), amount, validAfter, validBefore, nonce, signature
            );
        }
        _transfer(token, BATCH_SETTLEMENT, amount);
    }

    /// @dev `token.transfer(to, amount)`, accepting tokens that return nothing.
    function _transfer(address token, address to, uint256 amount) private {
        (bool ok, bytes memory ret) = token.call(abi.encodeWithSelector(0xa9059cbb, to, amount));
        if (!ok) {
            if (ret.length == 0) revert TransferFailed();
            assembly ("memory-safe") {
                revert(add(ret, 32), mload(ret))
            }
        }
        if (ret.length != 0 && (ret.length < 32 || !abi.decode(ret, (bool)))) revert TransferFailed();
    }
}
