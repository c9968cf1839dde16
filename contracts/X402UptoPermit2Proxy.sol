// SPDX-License-Identifier: MIT
pragma solidity ^0.8.28;

/// @dev The part of Permit2's SignatureTransfer interface this proxy calls.
interface ISignatureTransferWitness {
    struct TokenPermissions {
        address token;
        uint256 amount;
    }

    struct PermitTransferFrom {
        TokenPermissions permitted;
        uint256 nonce;
        uint256 deadline;
    }

    struct SignatureTransferDetails {
        address to;
        uint256 requestedAmount;
    }

    function permitWitnessTransferFrom(
        PermitTransferFrom calldata permit,
        SignatureTransferDetails calldata transferDetails,
        address owner,
        bytes32 witness,
        string calldata witnessTypeString,
        bytes calldata signature
    ) external;
}

/// @dev EIP-2612 `permit` and the ERC-20 `allowance` read.
interface IERC20PermitAllowance {
    function permit(address owner, address spender, uint256 value, uint256 deadline, uint8 v, bytes32 r, bytes32 s)
        external;

    function allowance(address owner, address spender) external view returns (uint256);
}

/// @title x402 `upto` Permit2 proxy for the tollway devnet
/// @notice The spender of x402 `upto` payments (specs/schemes/upto/scheme_upto_evm.md): the payer
///         signs a Permit2 `PermitWitnessTransferFrom` for a maximum amount, naming this contract as
///         the spender and carrying the witness {to, facilitator, validAfter}; the facilitator named
///         in the witness later settles any amount up to that maximum, once, to `witness.to`.
///         Nobody else can settle it, and the money can go nowhere else: the witness is part of the
///         signed message, which Permit2 checks.
/// @dev Written from the x402 spec and the x402 SDK's ABI (`X402_UPTO_PERMIT2_PROXY_ABI`,
///      `X402_UPTO_PERMIT2_PROXY_SETTLE_WITH_PERMIT_ABI`). Placed at
///      0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002 with `anvil_setCode`: no constructor, no
///      immutables, no storage (Permit2's address is a constant; the reentrancy lock is transient).
///      NOT for production.
contract X402UptoPermit2Proxy {
    /// @notice The canonical Permit2.
    address public constant PERMIT2 = 0x000000000022D473030F116dDEE9F6B43aC78BA3;

    /// @notice What follows Permit2's "PermitWitnessTransferFrom(...,uint256 deadline," stub: the
    ///         witness field, then the referenced struct types in alphabetical order (EIP-712).
    string public constant WITNESS_TYPE_STRING =
        "Witness witness)TokenPermissions(address token,uint256 amount)Witness(address to,address facilitator,uint256 validAfter)";
    bytes32 public constant WITNESS_TYPEHASH = keccak256("Witness(address to,address facilitator,uint256 validAfter)");

    struct Witness {
        address to;
        address facilitator;
        uint256 validAfter;
    }

    struct EIP2612Permit {
        uint256 value;
        uint256 deadline;
        bytes32 r;
        bytes32 s;
        uint8 v;
    }

    error InvalidOwner();
    error InvalidDestination();
    /// @notice `block.timestamp < witness.validAfter`.
    error PaymentTooEarly();
    /// @notice A zero settlement amount, or a zero permitted maximum.
    error InvalidAmount();
    /// @notice The settlement amount is above the signed maximum.
    error AmountExceedsPermitted();
    /// @notice `msg.sender` is not the facilitator named in the witness.
    error UnauthorizedFacilitator();
    /// @notice The EIP-2612 permit's value differs from the Permit2 maximum.
    error Permit2612AmountMismatch();
    /// @notice The EIP-2612 permit failed and Permit2 is not already allowed the amount.
    error Permit2612Failed(bytes reason);
    error Reentrancy();

    /// @notice `amount` of `token` went from `owner` to `to`, settled by `facilitator`.
    event Settled(
        address indexed owner, address indexed to, address indexed token, uint256 amount, address facilitator
    );
    /// @notice The EIP-2612 permit of a `settleWithPermit` failed (typically: already used), but
    ///         Permit2's allowance already covered the amount, so the settlement went on.
    event EIP2612PermitFailed(address indexed token, address indexed owner, bytes reason);

    bool private transient _entered;

    modifier nonReentrant() {
        if (_entered) revert Reentrancy();
        _entered = true;
        _;
        _entered = false;
    }

    /// @notice Settle `amount` (0 < amount <= permit.permitted.amount) of a signed upto payment.
    function settle(
        ISignatureTransferWitness.PermitTransferFrom calldata permit,
        uint256 amount,
        address owner,
        Witness calldata witness,
        bytes calldata signature
    ) external nonReentrant {
        _checkSettlement(permit, amount, owner, witness);
        _settle(permit, amount, owner, witness, signature);
    }

    /// @notice Like `settle`, after first submitting the owner's EIP-2612 permit allowing Permit2
    ///         `permit2612.value` (which must equal the signed maximum) of the token, so that a
    ///         wallet that never approved Permit2 (and holds no ETH) can pay. If the permit fails
    ///         (e.g. it was already submitted) the settlement still goes on when Permit2's allowance
    ///         already covers `amount`; otherwise the permit's failure is the revert reason.
    function settleWithPermit(
        EIP2612Permit calldata permit2612,
        ISignatureTransferWitness.PermitTransferFrom calldata permit,
        uint256 amount,
        address owner,
        Witness calldata witness,
        bytes calldata signature
    ) external nonReentrant {
        _checkSettlement(permit, amount, owner, witness);
        if (permit2612.value != permit.permitted.amount) revert Permit2612AmountMismatch();
        address token = permit.permitted.token;
        try IERC20PermitAllowance(token).permit(
            owner, PERMIT2, permit2612.value, permit2612.deadline, permit2612.v, permit2612.r, permit2612.s
        ) {} catch (bytes memory reason) {
            if (IERC20PermitAllowance(token).allowance(owner, PERMIT2) < amount) revert Permit2612Failed(reason);
            emit EIP2612PermitFailed(token, owner, reason);
        }
        _settle(permit, amount, owner, witness, signature);
    }

    function _checkSettlement(
        ISignatureTransferWitness.PermitTransferFrom calldata permit,
        uint256 amount,
        address owner,
        Witness calldata witness
    ) private view {
        if (msg.sender != witness.facilitator) revert UnauthorizedFacilitator();
        if (owner == address(0)) revert InvalidOwner();
        if (witness.to == address(0)) revert InvalidDestination();
        if (block.timestamp < witness.validAfter) revert PaymentTooEarly();
        if (amount == 0 || permit.permitted.amount == 0) revert InvalidAmount();
        if (amount > permit.permitted.amount) revert AmountExceedsPermitted();
    }

    function _settle(
        ISignatureTransferWitness.PermitTransferFrom calldata permit,
        uint256 amount,
        address owner,
        Witness calldata witness,
        bytes calldata signature
    ) private {
        bytes32 witnessHash = keccak256(abi.encode(WITNESS_TYPEHASH, witness.to, witness.facilitator, witness.validAfter));
        ISignatureTransferWitness(PERMIT2).permitWitnessTransferFrom(
            permit,
            ISignatureTransferWitness.SignatureTransferDetails({to: witness.to, requestedAmount: amount}),
            owner,
            witnessHash,
            WITNESS_TYPE_STRING,
            signature
        );
        emit Settled(owner, witness.to, permit.permitted.token, amount, msg.sender);
    }
}
