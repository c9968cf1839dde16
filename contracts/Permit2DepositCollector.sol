// SPDX-License-Identifier: MIT
pragma solidity ^0.8.28;

/// @dev The part of Permit2's SignatureTransfer interface this collector calls.
interface IPermit2WitnessTransfer {
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

/// @dev EIP-2612 `permit`.
interface IERC20Permit {
    function permit(address owner, address spender, uint256 value, uint256 deadline, uint8 v, bytes32 r, bytes32 s)
        external;
}

/// @title x402 batch-settlement Permit2 deposit collector for the tollway devnet
/// @notice Pulls a channel deposit from the payer through Permit2: the payer signed a
///         `PermitWitnessTransferFrom` of exactly the deposit, naming this contract as the spender and
///         carrying the witness `DepositWitness(bytes32 channelId)`, so the signature binds the deposit
///         to one channel; Permit2 sends it straight to the batch-settlement escrow. For a payer that
///         never approved Permit2, an EIP-2612 permit (payer → Permit2) can ride along and is
///         submitted first (its failure is ignored: e.g. it was already used, and the allowance is
///         there; otherwise Permit2's transfer fails).
/// @dev `collectorData` = `abi.encode(uint256 nonce, uint256 deadline, bytes permit2Signature,
///      bytes eip2612Permit)` where `eip2612Permit` is empty or `abi.encode(uint256 value,
///      uint256 deadline, uint8 v, bytes32 r, bytes32 s)` (the x402 SDK's
///      `build_permit2_collector_data` / `build_eip2612_permit_data`). Written from the x402 spec and
///      SDK; placed at 0x4020425FAf3B746C082C2f942b4E5159887B0005 with `anvil_setCode` (no
///      constructor, no immutables, no storage). NOT for production.
contract Permit2DepositCollector {
    /// @notice The batch-settlement escrow: the only caller, and where every deposit goes.
    address public constant BATCH_SETTLEMENT = 0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003;
    /// @notice The canonical Permit2.
    address public constant PERMIT2 = 0x000000000022D473030F116dDEE9F6B43aC78BA3;

    /// @notice What follows Permit2's "PermitWitnessTransferFrom(...,uint256 deadline," stub: the
    ///         witness field, then the referenced struct types in alphabetical order (EIP-712).
    string public constant WITNESS_TYPE_STRING =
        "DepositWitness witness)DepositWitness(bytes32 channelId)TokenPermissions(address token,uint256 amount)";
    bytes32 public constant DEPOSIT_WITNESS_TYPEHASH = keccak256("DepositWitness(bytes32 channelId)");

    error OnlyBatchSettlement();

    /// @notice The EIP-2612 permit carried with a deposit failed; the deposit went on (Permit2's
    ///         transfer then decides).
    event EIP2612PermitFailed(address indexed token, address indexed owner, bytes reason);

    /// @notice Move `amount` of `token` from `payer` to the escrow, on the payer's Permit2 signature for
    ///         the channel `channelId` carried in `data`.
    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata data) external {
        if (msg.sender != BATCH_SETTLEMENT) revert OnlyBatchSettlement();
        (uint256 nonce, uint256 deadline, bytes memory signature, bytes memory eip2612Permit) =
            abi.decode(data, (uint256, uint256, bytes, bytes));
        if (eip2612Permit.length != 0) _permit(payer, token, eip2612Permit);
        IPermit2WitnessTransfer(PERMIT2).permitWitnessTransferFrom(
            IPermit2WitnessTransfer.PermitTransferFrom({
                permitted: IPermit2WitnessTransfer.TokenPermissions({token: token, amount: amount}),
                nonce: nonce,
                deadline: deadline
            }),
            IPermit2WitnessTransfer.SignatureTransferDetails({to: BATCH_SETTLEMENT, requestedAmount: amount}),
            payer,
            keccak256(abi.encode(DEPOSIT_WITNESS_TYPEHASH, channelId)),
            WITNESS_TYPE_STRING,
            signature
        );
    }

    function _permit(address payer, address token, bytes memory eip2612Permit) private {
        (uint256 value, uint256 deadline, uint8 v, bytes32 r, bytes32 s) =
            abi.decode(eip2612Permit, (uint256, uint256, uint8, bytes32, bytes32));
        try IERC20Permit(token).permit(payer, PERMIT2, value, deadline, v, r, s) {}
        catch (bytes memory reason) {
            emit EIP2612PermitFailed(token, payer, reason);
        }
    }
}
