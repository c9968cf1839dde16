// SPDX-License-Identifier: MIT
pragma solidity ^0.8.28;

/// @title Permit2 (SignatureTransfer subset) for the tollway devnet
/// @notice A from-scratch stand-in for the signature-transfer half of Uniswap's Permit2, written
///         against its documented interface so that off-chain code (the x402 SDK) works unchanged
///         on a local anvil:
///         - `permitTransferFrom` / `permitWitnessTransferFrom` move `requestedAmount`
///           (<= `permitted.amount`) of a token the owner has approved to this contract, to
///           `transferDetails.to`, on the owner's EIP-712 signature naming `msg.sender` as the
///           spender;
///         - nonces are unordered: bit `nonce & 0xff` of word `nonce >> 8` of `nonceBitmap[owner]`,
///           spent by a transfer or by `invalidateUnorderedNonces`;
///         - the EIP-712 domain is {name: "Permit2", chainId, verifyingContract} (no version).
///         The AllowanceTransfer half (approve / permit / transferFrom with allowances) is absent.
/// @dev Placed at 0x000000000022D473030F116dDEE9F6B43aC78BA3 with `anvil_setCode`: no constructor,
///      no immutables, and the domain separator is computed on every call from `block.chainid` and
///      `address(this)`. Storage starts empty. Signatures: 65-byte r‖s‖v (v 27/28, low s) or 64-byte
///      EIP-2098 r‖vs from an owner without code; EIP-1271 `isValidSignature` for an owner with code.
///      NOT for production.
contract Permit2 {
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

    /// @notice The signature's deadline has passed.
    error SignatureExpired(uint256 signatureDeadline);
    /// @notice More was requested than the permit allows.
    error InvalidAmount(uint256 maxAmount);
    /// @notice The nonce was already spent (or invalidated).
    error InvalidNonce();
    /// @notice Malformed or malleable ECDSA signature, or one that recovers to no address.
    error InvalidSignature();
    error InvalidSignatureLength();
    /// @notice The ECDSA signature recovers to someone other than the owner.
    error InvalidSigner();
    /// @notice The owner is a contract and its EIP-1271 `isValidSignature` refused the signature.
    error InvalidContractSignature();
    /// @notice The token's `transferFrom` failed without a reason, or returned false.
    error TransferFailed();

    event UnorderedNonceInvalidation(address indexed owner, uint256 word, uint256 mask);

    bytes32 private constant _DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,uint256 chainId,address verifyingContract)");
    bytes32 private constant _NAME_HASH = keccak256("Permit2");

    bytes32 public constant TOKEN_PERMISSIONS_TYPEHASH = keccak256("TokenPermissions(address token,uint256 amount)");
    bytes32 public constant PERMIT_TRANSFER_FROM_TYPEHASH = keccak256(
        "PermitTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,uint256 deadline)"
        "TokenPermissions(address token,uint256 amount)"
    );
    /// @notice The witness type hash is keccak256 of this stub followed by the caller's
    ///         `witnessTypeString` (which closes the struct and appends the referenced types).
    string public constant PERMIT_WITNESS_TRANSFER_FROM_TYPE_STUB =
        "PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,uint256 deadline,";

    uint256 private constant _HALF_CURVE_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;
    bytes4 private constant _EIP1271_MAGIC = 0x1626ba7e;

    /// @notice owner => word position => bitmap of spent nonces.
    mapping(address => mapping(uint256 => uint256)) public nonceBitmap;

    /// @notice The EIP-712 domain separator for the current chain and this address.
    // solhint-disable-next-line func-name-mixedcase
    function DOMAIN_SEPARATOR() public view returns (bytes32) {
        return keccak256(abi.encode(_DOMAIN_TYPEHASH, _NAME_HASH, block.chainid, address(this)));
    }

    /// @notice Spend (invalidate) the nonces of `msg.sender` set in `mask`, in word `wordPos`.
    function invalidateUnorderedNonces(uint256 wordPos, uint256 mask) external {
        nonceBitmap[msg.sender][wordPos] |= mask;
        emit UnorderedNonceInvalidation(msg.sender, wordPos, mask);
    }

    /// @notice Transfer on a signed `PermitTransferFrom` naming `msg.sender` as the spender.
    function permitTransferFrom(
        PermitTransferFrom calldata permit,
        SignatureTransferDetails calldata transferDetails,
        address owner,
        bytes calldata signature
    ) external {
        bytes32 structHash = keccak256(
            abi.encode(
                PERMIT_TRANSFER_FROM_TYPEHASH, _hashTokenPermissions(permit.permitted), msg.sender, permit.nonce, permit.deadline
            )
        );
        _permitTransfer(permit, transferDetails, owner, structHash, signature);
    }

    /// @notice Transfer on a signed `PermitWitnessTransferFrom` naming `msg.sender` as the spender.
    /// @param witness The EIP-712 hash of the caller's witness struct.
    /// @param witnessTypeString The rest of the type string after the stub, e.g.
    ///        "Witness witness)TokenPermissions(address token,uint256 amount)Witness(...)".
    function permitWitnessTransferFrom(
        PermitTransferFrom calldata permit,
        SignatureTransferDetails calldata transferDetails,
        address owner,
        bytes32 witness,
        string calldata witnessTypeString,
        bytes calldata signature
    ) external {
        bytes32 typeHash = keccak256(abi.encodePacked(PERMIT_WITNESS_TRANSFER_FROM_TYPE_STUB, witnessTypeString));
        bytes32 structHash = keccak256(
            abi.encode(
                typeHash, _hashTokenPermissions(permit.permitted), msg.sender, permit.nonce, permit.deadline, witness
            )
        );
        _permitTransfer(permit, transferDetails, owner, structHash, signature);
    }

    function _hashTokenPermissions(TokenPermissions calldata permitted) private pure returns (bytes32) {
        return keccak256(abi.encode(TOKEN_PERMISSIONS_TYPEHASH, permitted.token, permitted.amount));
    }

    function _permitTransfer(
        PermitTransferFrom calldata permit,
        SignatureTransferDetails calldata transferDetails,
        address owner,
        bytes32 structHash,
        bytes calldata signature
    ) private {
        if (block.timestamp > permit.deadline) revert SignatureExpired(permit.deadline);
        if (transferDetails.requestedAmount > permit.permitted.amount) revert InvalidAmount(permit.permitted.amount);
        _useUnorderedNonce(owner, permit.nonce);
        _verify(keccak256(abi.encodePacked("\x19\x01", DOMAIN_SEPARATOR(), structHash)), owner, signature);
        _transferFrom(permit.permitted.token, owner, transferDetails.to, transferDetails.requestedAmount);
    }

    function _useUnorderedNonce(address owner, uint256 nonce) private {
        uint256 bit = 1 << (nonce & 0xff);
        uint256 word = nonceBitmap[owner][nonce >> 8];
        if (word & bit != 0) revert InvalidNonce();
        nonceBitmap[owner][nonce >> 8] = word | bit;
    }

    function _verify(bytes32 digest, address owner, bytes calldata signature) private view {
        if (owner.code.length > 0) {
            (bool ok, bytes memory ret) =
                owner.staticcall(abi.encodeWithSelector(_EIP1271_MAGIC, digest, signature));
            if (!ok || ret.length < 32 || abi.decode(ret, (bytes4)) != _EIP1271_MAGIC) {
                revert InvalidContractSignature();
            }
            return;
        }
        bytes32 r;
        bytes32 s;
        uint8 v;
        if (signature.length == 65) {
            r = bytes32(signature[0:32]);
            s = bytes32(signature[32:64]);
            v = uint8(signature[64]);
        } else if (signature.length == 64) {
            // EIP-2098 compact form: r ‖ (yParity << 255 | s)
            r = bytes32(signature[0:32]);
            bytes32 vs = bytes32(signature[32:64]);
            s = vs & bytes32(type(uint256).max >> 1);
            v = uint8(uint256(vs >> 255)) + 27;
        } else {
            revert InvalidSignatureLength();
        }
        if (uint256(s) > _HALF_CURVE_ORDER || (v != 27 && v != 28)) revert InvalidSignature();
        address signer = ecrecover(digest, v, r, s);
        if (signer == address(0)) revert InvalidSignature();
        if (signer != owner) revert InvalidSigner();
    }

    /// @dev `token.transferFrom(from, to, amount)`, accepting tokens that return nothing; a revert
    ///      of the token is passed on as is (e.g. "ERC20: transfer amount exceeds allowance").
    function _transferFrom(address token, address from, address to, uint256 amount) private {
        if (token.code.length == 0) revert TransferFailed();
        (bool ok, bytes memory ret) = token.call(abi.encodeWithSelector(0x23b872dd, from, to, amount));
        if (!ok) {
            if (ret.length == 0) revert TransferFailed();
            assembly ("memory-safe") {
                revert(add(ret, 32), mload(ret))
            }
        }
        if (ret.length != 0 && (ret.length < 32 || !abi.decode(ret, (bool)))) revert TransferFailed();
    }
}
