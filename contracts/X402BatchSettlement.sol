// SPDX-License-Identifier: MIT
pragma solidity ^0.8.28;

/// @dev What a deposit collector does for the escrow: move `amount` of `token` from `payer` into the
///      escrow on the payer's signed authorization, which must bind `channelId`.
interface IBatchDepositCollector {
    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata data) external;
}

/// @title x402 batch-settlement escrow for the tollway devnet
/// @notice Stateless unidirectional payment channels (specs/schemes/batch-settlement): a payer
///         deposits once (through one of the two canonical deposit collectors, gasless for the payer),
///         then signs cumulative EIP-712 vouchers `Voucher(bytes32 channelId,uint128 maxClaimableAmount)`
///         off chain; the receiver side claims them in batches (`claim`, or `claimWithSignature` relayed
///         by anyone on a `ClaimBatch` signature of the receiver authorizer), which only moves
///         accounting, and `settle` sweeps everything claimed for a (receiver, token) to the receiver in
///         one transfer. The unclaimed rest goes back to the payer through a cooperative refund
///         (`refund` by the receiver side, `refundWithSignature` relayed on a `Refund` signature of the
///         receiver authorizer) or, unilaterally, through a timed withdrawal (`initiateWithdraw`, then
///         `finalizeWithdraw` once the channel's `withdrawDelay` has elapsed; the receiver can still
///         claim in between).
///
///         Per channel: `balance` (deposited minus withdrawn and refunded) and `totalClaimed`
///         (monotonic, never above `balance`); only `balance - totalClaimed` can leave to the payer.
///         The channel id is the EIP-712 hash of its immutable `ChannelConfig` under the domain
///         {name: "x402 Batch Settlement", version: "1", chainId, verifyingContract: this}.
/// @dev Written from the x402 spec and the x402 SDK's ABI (`BATCH_SETTLEMENT_ABI`) and EIP-712 types.
///      Placed at 0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003 with `anvil_setCode`: no constructor,
///      no immutables (the domain separator is computed per call; the collectors' addresses are
///      constants), storage starts empty, the reentrancy lock is transient (EIP-1153).
///      NOT for production.
contract X402BatchSettlement {
    // ------------------------------------------------------------------------------------------
    // Types
    // ------------------------------------------------------------------------------------------

    struct ChannelConfig {
        address payer;
        address payerAuthorizer; // the voucher signer (ECDSA), or 0: the payer signs (ECDSA or EIP-1271)
        address receiver;
        address receiverAuthorizer; // signs claim batches and refunds; never 0
        address token;
        uint40 withdrawDelay; // seconds, MIN_WITHDRAW_DELAY..MAX_WITHDRAW_DELAY
        bytes32 salt;
    }

    struct Voucher {
        ChannelConfig channel;
        uint128 maxClaimableAmount;
    }

    /// @notice One row of a claim: the payer's voucher and the cumulative total to claim under it.
    struct VoucherClaim {
        Voucher voucher;
        bytes signature; // the payer's voucher signature
        uint128 totalClaimed; // the channel's new cumulative claimed total (<= maxClaimableAmount)
    }

    struct ChannelState {
        uint128 balance;
        uint128 totalClaimed;
    }

    struct PendingWithdrawal {
        uint128 amount;
        uint40 initiatedAt;
    }

    struct ReceiverState {
        uint128 totalClaimed;
        uint128 totalSettled;
    }

    // ------------------------------------------------------------------------------------------
    // Constants
    // ------------------------------------------------------------------------------------------

    address public constant ERC3009_DEPOSIT_COLLECTOR = 0x4020806089470a89826cB9fB1f4059150b550004;
    address public constant PERMIT2_DEPOSIT_COLLECTOR = 0x4020425FAf3B746C082C2f942b4E5159887B0005;

    uint40 public constant MIN_WITHDRAW_DELAY = 900; // 15 minutes
    uint40 public constant MAX_WITHDRAW_DELAY = 2_592_000; // 30 days

    string public constant NAME = "x402 Batch Settlement";
    string public constant VERSION = "1";

    bytes32 private constant _DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    bytes32 private constant _NAME_HASH = keccak256(bytes(NAME));
    bytes32 private constant _VERSION_HASH = keccak256(bytes(VERSION));

    bytes32 public constant CHANNEL_CONFIG_TYPEHASH = keccak256(
        "ChannelConfig(address payer,address payerAuthorizer,address receiver,address receiverAuthorizer,"
        "address token,uint40 withdrawDelay,bytes32 salt)"
    );
    bytes32 public constant VOUCHER_TYPEHASH = keccak256("Voucher(bytes32 channelId,uint128 maxClaimableAmount)");
    bytes32 public constant REFUND_TYPEHASH = keccak256("Refund(bytes32 channelId,uint256 nonce,uint128 amount)");
    bytes32 public constant CLAIM_ENTRY_TYPEHASH =
        keccak256("ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)");
    bytes32 public constant CLAIM_BATCH_TYPEHASH = keccak256(
        "ClaimBatch(ClaimEntry[] claims)ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)"
    );

    uint256 private constant _HALF_CURVE_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;
    bytes4 private constant _EIP1271_MAGIC = 0x1626ba7e;

    // ------------------------------------------------------------------------------------------
    // State
    // ------------------------------------------------------------------------------------------

    /// @notice channelId => (balance, totalClaimed).
    mapping(bytes32 => ChannelState) public channels;
    /// @notice channelId => the payer's pending timed withdrawal (initiatedAt 0: none).
    mapping(bytes32 => PendingWithdrawal) public pendingWithdrawals;
    /// @notice receiver => token => (claimed over all its channels, swept to it so far).
    mapping(address => mapping(address => ReceiverState)) public receivers;
    /// @notice channelId => the nonce the next `refundWithSignature` must carry.
    mapping(bytes32 => uint256) public refundNonce;

    bool private transient _entered;

    // ------------------------------------------------------------------------------------------
    // Events and errors
    // ------------------------------------------------------------------------------------------

    /// @notice A channel's balance went from zero to positive (its first deposit, or a deposit after
    ///         it was drained).
    event ChannelCreated(bytes32 indexed channelId, ChannelConfig config);
    /// @notice A channel's balance went back to zero (full refund or withdrawal of an unclaimed channel).
    event ChannelClosed(bytes32 indexed channelId, ChannelConfig config);
    event Deposited(
        bytes32 indexed channelId, address indexed payer, address indexed collector, uint128 amount, uint128 balance
    );
    /// @notice `amount` more was claimed from the channel, for its receiver; its claimed total is now `totalClaimed`.
    event Claimed(
        bytes32 indexed channelId, address indexed receiver, address indexed token, uint128 amount, uint128 totalClaimed
    );
    /// @notice `amount` of `token` claimed for `receiver` was transferred to it (`sender` called `settle`).
    event Settled(address indexed receiver, address indexed token, address indexed sender, uint128 amount);
    /// @notice A cooperative refund returned `amount` to the payer; it used refund nonce `nonce`.
    event Refunded(bytes32 indexed channelId, address indexed payer, uint128 amount, uint256 nonce);
    event WithdrawInitiated(bytes32 indexed channelId, uint128 amount, uint40 initiatedAt, uint40 finalizableAt);
    event WithdrawFinalized(bytes32 indexed channelId, address indexed payer, uint128 amount);

    error Reentrancy();
    error ZeroAmount();
    error AmountOverflow();
    error InvalidChannelConfig();
    error UnknownCollector(address collector);
    error DepositNotReceived(uint256 received);
    error EmptyClaim();
    /// @notice The caller is not allowed to do this for the channel.
    error Unauthorized();
    /// @notice The rows of a `claimWithSignature` name different receiver authorizers.
    error MixedReceiverAuthorizers();
    /// @notice The receiver authorizer's signature (claim batch or refund) does not verify.
    error InvalidAuthorizerSignature();
    /// @notice The payer's voucher signature does not verify.
    error InvalidVoucherSignature(bytes32 channelId);
    /// @notice A claim above the voucher's `maxClaimableAmount`.
    error ClaimExceedsVoucher(bytes32 channelId);
    /// @notice A claim above the channel's balance.
    error ClaimExceedsBalance(bytes32 channelId);
    error InvalidRefundNonce(uint256 expected);
    error WithdrawExceedsAvailable(uint128 available);
    error WithdrawalPending();
    error NoPendingWithdrawal();
    error WithdrawDelayNotElapsed(uint256 finalizableAt);
    error TransferFailed();

    modifier nonReentrant() {
        if (_entered) revert Reentrancy();
        _entered = true;
        _;
        _entered = false;
    }

    // ------------------------------------------------------------------------------------------
    // Deposits
    // ------------------------------------------------------------------------------------------

    /// @notice Deposit `amount` into the channel of `config` through `collector` (one of the two
    ///         canonical collectors), which pulls it from the payer on the authorization in
    ///         `collectorData` (bound to the channel id). Anyone may submit it.
    function deposit(ChannelConfig calldata config, uint128 amount, address collector, bytes calldata collectorData)
        external
        nonReentrant
    {
        if (amount == 0) revert ZeroAmount();
        if (collector != ERC3009_DEPOSIT_COLLECTOR && collector != PERMIT2_DEPOSIT_COLLECTOR) {
            revert UnknownCollector(collector);
        }
        _validateConfig(config);
        bytes32 id = _channelId(config);
        ChannelState storage ch = channels[id];
        uint128 previous = ch.balance;
        if (uint256(previous) + amount > type(uint128).max) revert AmountOverflow();

        uint256 before = _balanceOf(config.token);
        IBatchDepositCollector(collector).collect(config.payer, config.token, amount, id, collectorData);
        uint256 received = _balanceOf(config.token) - before;
        if (received != amount) revert DepositNotReceived(received);

        ch.balance = previous + amount;
        if (previous == 0) emit ChannelCreated(id, config);
        emit Deposited(id, config.payer, collector, amount, previous + amount);
    }

    // ------------------------------------------------------------------------------------------
    // Claims and settlement
    // ------------------------------------------------------------------------------------------

    /// @notice Claim vouchers of several channels; the caller must be the receiver or the receiver
    ///         authorizer of every row. A row whose `totalClaimed` is not above the channel's claimed
    ///         total changes nothing (so a replayed claim moves nothing twice).
    function claim(VoucherClaim[] calldata voucherClaims) external nonReentrant {
        if (voucherClaims.length == 0) revert EmptyClaim();
        for (uint256 i = 0; i < voucherClaims.length; i++) {
            ChannelConfig calldata cfg = voucherClaims[i].voucher.channel;
            if (msg.sender != cfg.receiver && msg.sender != cfg.receiverAuthorizer) revert Unauthorized();
            _claim(voucherClaims[i], _channelId(cfg));
        }
    }

    /// @notice `claim`, relayed by anyone: `authorizerSignature` is the rows' (common) receiver
    ///         authorizer's EIP-712 signature of `ClaimBatch(ClaimEntry[] claims)`, one entry
    ///         `(channelId, maxClaimableAmount, totalClaimed)` per row, in order.
    function claimWithSignature(VoucherClaim[] calldata voucherClaims, bytes calldata authorizerSignature)
        external
        nonReentrant
    {
        uint256 n = voucherClaims.length;
        if (n == 0) revert EmptyClaim();
        address authorizer = voucherClaims[0].voucher.channel.receiverAuthorizer;
        bytes32[] memory ids = new bytes32[](n);
        bytes32[] memory entries = new bytes32[](n);
        for (uint256 i = 0; i < n; i++) {
            VoucherClaim calldata c = voucherClaims[i];
            if (c.voucher.channel.receiverAuthorizer != authorizer) revert MixedReceiverAuthorizers();
            ids[i] = _channelId(c.voucher.channel);
            entries[i] = keccak256(abi.encode(CLAIM_ENTRY_TYPEHASH, ids[i], c.voucher.maxClaimableAmount, c.totalClaimed));
        }
        bytes32 digest = _hashTypedData(keccak256(abi.encode(CLAIM_BATCH_TYPEHASH, keccak256(abi.encodePacked(entries)))));
        if (authorizer == address(0) || !_isValidSignatureNow(authorizer, digest, authorizerSignature)) {
            revert InvalidAuthorizerSignature();
        }
        for (uint256 i = 0; i < n; i++) {
            _claim(voucherClaims[i], ids[i]);
        }
    }

    /// @notice Transfer everything claimed but not yet settled for `receiver` in `token` to `receiver`.
    ///         Permissionless; settling nothing is a no-op that still emits `Settled(…, 0)`.
    function settle(address receiver, address token) external nonReentrant {
        ReceiverState storage r = receivers[receiver][token];
        uint128 amount = r.totalClaimed - r.totalSettled;
        r.totalSettled = r.totalClaimed;
        if (amount > 0) _transfer(token, receiver, amount);
        emit Settled(receiver, token, msg.sender, amount);
    }

    // ------------------------------------------------------------------------------------------
    // Cooperative refunds
    // ------------------------------------------------------------------------------------------

    /// @notice Return up to `amount` of the channel's unclaimed balance to the payer; the caller must
    ///         be the receiver or the receiver authorizer. Advances the refund nonce.
    function refund(ChannelConfig calldata config, uint128 amount) external nonReentrant {
        if (msg.sender != config.receiver && msg.sender != config.receiverAuthorizer) revert Unauthorized();
        _refund(config, _channelId(config), amount);
    }

    /// @notice `refund`, relayed by anyone on the receiver authorizer's EIP-712 signature of
    ///         `Refund(bytes32 channelId,uint256 nonce,uint128 amount)`; `nonce` must be the channel's
    ///         current `refundNonce`.
    function refundWithSignature(
        ChannelConfig calldata config,
        uint128 amount,
        uint256 nonce,
        bytes calldata receiverAuthorizerSignature
    ) external nonReentrant {
        bytes32 id = _channelId(config);
        uint256 expected = refundNonce[id];
        if (nonce != expected) revert InvalidRefundNonce(expected);
        address authorizer = config.receiverAuthorizer;
        if (
            authorizer == address(0)
                || !_isValidSignatureNow(authorizer, getRefundDigest(id, nonce, amount), receiverAuthorizerSignature)
        ) revert InvalidAuthorizerSignature();
        _refund(config, id, amount);
    }

    // ------------------------------------------------------------------------------------------
    // Timed withdrawal (the payer's escape hatch)
    // ------------------------------------------------------------------------------------------

    /// @notice Start withdrawing `amount` (at most the unclaimed balance now) back to the payer; the
    ///         caller must be the payer or its payer authorizer. It can be finalized `withdrawDelay`
    ///         seconds later; until then the receiver can still claim.
    function initiateWithdraw(ChannelConfig calldata config, uint128 amount) external nonReentrant {
        _onlyPayer(config);
        if (amount == 0) revert ZeroAmount();
        bytes32 id = _channelId(config);
        PendingWithdrawal storage p = pendingWithdrawals[id];
        if (p.initiatedAt != 0) revert WithdrawalPending();
        ChannelState storage ch = channels[id];
        uint128 available = ch.balance - ch.totalClaimed;
        if (amount > available) revert WithdrawExceedsAvailable(available);
        uint40 now_ = uint40(block.timestamp);
        p.amount = amount;
        p.initiatedAt = now_;
        emit WithdrawInitiated(id, amount, now_, now_ + config.withdrawDelay);
    }

    /// @notice Finish a timed withdrawal once the delay has elapsed: the pending amount, capped at
    ///         what is still unclaimed, goes to the payer. Payer or payer authorizer only.
    function finalizeWithdraw(ChannelConfig calldata config) external nonReentrant {
        _onlyPayer(config);
        bytes32 id = _channelId(config);
        PendingWithdrawal memory p = pendingWithdrawals[id];
        if (p.initiatedAt == 0) revert NoPendingWithdrawal();
        uint256 finalizableAt = uint256(p.initiatedAt) + config.withdrawDelay;
        if (block.timestamp < finalizableAt) revert WithdrawDelayNotElapsed(finalizableAt);
        delete pendingWithdrawals[id];
        ChannelState storage ch = channels[id];
        uint128 available = ch.balance - ch.totalClaimed;
        uint128 amount = p.amount < available ? p.amount : available;
        if (amount > 0) {
            ch.balance -= amount;
            _transfer(config.token, config.payer, amount);
            if (ch.balance == 0) emit ChannelClosed(id, config);
        }
        emit WithdrawFinalized(id, config.payer, amount);
    }

    // ------------------------------------------------------------------------------------------
    // Batching
    // ------------------------------------------------------------------------------------------

    /// @notice Run several calls of this contract in one transaction (e.g. a claim, then a refund),
    ///         all or nothing; their return data in order.
    function multicall(bytes[] calldata data) external returns (bytes[] memory results) {
        results = new bytes[](data.length);
        for (uint256 i = 0; i < data.length; i++) {
            (bool ok, bytes memory ret) = address(this).delegatecall(data[i]);
            if (!ok) {
                assembly ("memory-safe") {
                    revert(add(ret, 32), mload(ret))
                }
            }
            results[i] = ret;
        }
    }

    // ------------------------------------------------------------------------------------------
    // Views
    // ------------------------------------------------------------------------------------------

    /// @notice The EIP-712 domain separator for the current chain and this address.
    // solhint-disable-next-line func-name-mixedcase
    function DOMAIN_SEPARATOR() public view returns (bytes32) {
        return keccak256(abi.encode(_DOMAIN_TYPEHASH, _NAME_HASH, _VERSION_HASH, block.chainid, address(this)));
    }

    /// @notice ERC-5267 description of the EIP-712 domain.
    function eip712Domain()
        external
        view
        returns (
            bytes1 fields,
            string memory name,
            string memory version,
            uint256 chainId,
            address verifyingContract,
            bytes32 salt,
            uint256[] memory extensions
        )
    {
        return (hex"0f", NAME, VERSION, block.chainid, address(this), bytes32(0), new uint256[](0));
    }

    function getChannelId(ChannelConfig calldata config) external view returns (bytes32) {
        return _channelId(config);
    }

    function getVoucherDigest(bytes32 channelId, uint128 maxClaimableAmount) public view returns (bytes32) {
        return _hashTypedData(keccak256(abi.encode(VOUCHER_TYPEHASH, channelId, maxClaimableAmount)));
    }

    function getRefundDigest(bytes32 channelId, uint256 nonce, uint128 amount) public view returns (bytes32) {
        return _hashTypedData(keccak256(abi.encode(REFUND_TYPEHASH, channelId, nonce, amount)));
    }

    function getClaimBatchDigest(VoucherClaim[] calldata voucherClaims) external view returns (bytes32) {
        bytes32[] memory entries = new bytes32[](voucherClaims.length);
        for (uint256 i = 0; i < voucherClaims.length; i++) {
            VoucherClaim calldata c = voucherClaims[i];
            entries[i] = keccak256(
                abi.encode(CLAIM_ENTRY_TYPEHASH, _channelId(c.voucher.channel), c.voucher.maxClaimableAmount, c.totalClaimed)
            );
        }
        return _hashTypedData(keccak256(abi.encode(CLAIM_BATCH_TYPEHASH, keccak256(abi.encodePacked(entries)))));
    }

    // ------------------------------------------------------------------------------------------
    // Internals
    // ------------------------------------------------------------------------------------------

    function _claim(VoucherClaim calldata c, bytes32 id) private {
        ChannelState storage ch = channels[id];
        uint128 claimed = ch.totalClaimed;
        uint128 total = c.totalClaimed;
        if (total <= claimed) return; // already claimed (a replay or a stale row): nothing moves
        if (total > c.voucher.maxClaimableAmount) revert ClaimExceedsVoucher(id);
        if (total > ch.balance) revert ClaimExceedsBalance(id);
        ChannelConfig calldata cfg = c.voucher.channel;
        bytes32 digest = getVoucherDigest(id, c.voucher.maxClaimableAmount);
        bool valid = cfg.payerAuthorizer != address(0)
            ? _recover(digest, c.signature) == cfg.payerAuthorizer
            : _isValidSignatureNow(cfg.payer, digest, c.signature);
        if (!valid) revert InvalidVoucherSignature(id);
        uint128 amount = total - claimed;
        ch.totalClaimed = total;
        receivers[cfg.receiver][cfg.token].totalClaimed += amount;
        emit Claimed(id, cfg.receiver, cfg.token, amount, total);
    }

    /// @dev The nonce advances first, whatever moves: even a refund with nothing left to return
    ///      invalidates signatures for the previous nonce.
    function _refund(ChannelConfig calldata config, bytes32 id, uint128 amount) private {
        if (amount == 0) revert ZeroAmount();
        uint256 nonce = refundNonce[id]++;
        ChannelState storage ch = channels[id];
        uint128 available = ch.balance - ch.totalClaimed;
        uint128 actual = amount < available ? amount : available;
        if (actual == 0) return;
        ch.balance -= actual;
        PendingWithdrawal storage p = pendingWithdrawals[id];
        if (p.initiatedAt != 0) {
            if (actual >= p.amount) delete pendingWithdrawals[id];
            else p.amount -= actual;
        }
        _transfer(config.token, config.payer, actual);
        emit Refunded(id, config.payer, actual, nonce);
        if (ch.balance == 0) emit ChannelClosed(id, config);
    }

    function _onlyPayer(ChannelConfig calldata config) private view {
        if (msg.sender != config.payer && (config.payerAuthorizer == address(0) || msg.sender != config.payerAuthorizer))
        {
            revert Unauthorized();
        }
    }

    function _validateConfig(ChannelConfig calldata c) private pure {
        if (
            c.payer == address(0) || c.receiver == address(0) || c.receiverAuthorizer == address(0)
                || c.token == address(0) || c.withdrawDelay < MIN_WITHDRAW_DELAY || c.withdrawDelay > MAX_WITHDRAW_DELAY
        ) revert InvalidChannelConfig();
    }

    function _channelId(ChannelConfig calldata c) private view returns (bytes32) {
        return _hashTypedData(
            keccak256(
                abi.encode(
                    CHANNEL_CONFIG_TYPEHASH,
                    c.payer,
                    c.payerAuthorizer,
                    c.receiver,
                    c.receiverAuthorizer,
                    c.token,
                    c.withdrawDelay,
                    c.salt
                )
            )
        );
    }

    function _hashTypedData(bytes32 structHash) private view returns (bytes32) {
        return keccak256(abi.encodePacked("\x19\x01", DOMAIN_SEPARATOR(), structHash));
    }

    /// @dev ECDSA recovery of a 65-byte r‖s‖v (v 27/28) or 64-byte EIP-2098 signature; address(0) for
    ///      anything malformed or malleable (high s).
    function _recover(bytes32 digest, bytes calldata signature) private pure returns (address) {
        bytes32 r;
        bytes32 s;
        uint8 v;
        if (signature.length == 65) {
            r = bytes32(signature[0:32]);
            s = bytes32(signature[32:64]);
            v = uint8(signature[64]);
        } else if (signature.length == 64) {
            r = bytes32(signature[0:32]);
            bytes32 vs = bytes32(signature[32:64]);
            s = vs & bytes32(type(uint256).max >> 1);
            v = uint8(uint256(vs >> 255)) + 27;
        } else {
            return address(0);
        }
        if (uint256(s) > _HALF_CURVE_ORDER || (v != 27 && v != 28)) return address(0);
        return ecrecover(digest, v, r, s);
    }

    /// @dev OpenZeppelin SignatureChecker semantics: an account with code answers EIP-1271
    ///      `isValidSignature`; one without must be the ECDSA signer.
    function _isValidSignatureNow(address signer, bytes32 digest, bytes calldata signature)
        private
        view
        returns (bool)
    {
        if (signer.code.length == 0) {
            address recovered = _recover(digest, signature);
            return recovered != address(0) && recovered == signer;
        }
        (bool ok, bytes memory ret) = signer.staticcall(abi.encodeWithSelector(_EIP1271_MAGIC, digest, signature));
        return ok && ret.length >= 32 && abi.decode(ret, (bytes32)) == bytes32(_EIP1271_MAGIC);
    }

    function _balanceOf(address token) private view returns (uint256) {
        (bool ok, bytes memory ret) = token.staticcall(abi.encodeWithSelector(0x70a08231, address(this)));
        if (!ok || ret.length < 32) revert TransferFailed();
        return abi.decode(ret, (uint256));
    }

    /// @dev `token.transfer(to, amount)`, accepting tokens that return nothing; a revert of the token
    ///      is passed on as is (e.g. "Blacklistable: account is blacklisted").
    function _transfer(address token, address to, uint256 amount) private {
        if (token.code.length == 0) revert TransferFailed();
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
