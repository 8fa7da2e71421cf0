package prefix

import (
	"crypto/sha256"
	"encoding/binary"
)

// vLLM's block hash under its sha256_cbor setting (vllm/v1/core/kv_cache_utils.py,
// hash_block_tokens): a block's key is
//
//	SHA-256(CBOR([parent, [token ids...], extra keys or null]))
//
// with CBOR in canonical form (RFC 8949: shortest lengths and integers), the parent a 32-byte
// byte string, the token ids integers and the extra keys an array of text strings. The first
// block's parent is NONE_HASH = SHA-256(CBOR(seed)) for the text string seed, the value of
// PYTHONHASHSEED the vLLM replicas run with (vLLM draws NONE_HASH at random when it is unset, so
// a fleet that shares keys sets it). The extra keys are the LoRA adapter's name on every block,
// then the request's cache salt on the first block only; a block with neither has null.

// VLLMExtra is what vLLM folds into a block's hash besides its tokens: the namespace of a
// request, as vLLM names it. A pagedkv Namespace maps to it as LoRAName = the name the runtime
// gives Namespace.Adapter, CacheSalt = Namespace.Salt.
type VLLMExtra struct {
	LoRAName  string // the LoRA adapter's name (vLLM's lora_name), "" for the base model
	CacheSalt string // the request's cache_salt, "" for none
}

// VLLMNoneHash returns vLLM's NONE_HASH under sha256_cbor for seed, the PYTHONHASHSEED value of
// the vLLM replicas ("0" is a common choice): the parent key of every sequence's first block.
func VLLMNoneHash(seed string) Key {
	var buf [9]byte
	b := appendCBORHead(buf[:0], cborText, uint64(len(seed)))
	h := sha256.New()
	h.Write(b)
	h.Write([]byte(seed))
	var k Key
	h.Sum(k[:0])
	return k
}

// VLLMHasher computes vLLM's sha256_cbor block keys, reusing its buffer so that it allocates
// nothing once warm. The zero VLLMHasher is ready to use; it is not safe for concurrent use.
type VLLMHasher struct {
	buf []byte
}

// Next returns the key of a block holding tokens whose parent has key parent, in namespace
// extra. first says the block starts its sequence (its parent is the NONE_HASH): only that block
// carries the cache salt. A nil VLLMHasher works, allocating its buffer each call.
func (x *VLLMHasher) Next(parent Key, tokens []Token, extra VLLMExtra, first bool) Key {
	if x == nil {
		x = new(VLLMHasher)
	}
	b := append(x.buf[:0], cborArray|3)
	b = appendCBORHead(b, cborBytes, uint64(len(parent)))
	b = append(b, parent[:]...)
	b = appendCBORHead(b, cborArray, uint64(len(tokens)))
	for _, t := range tokens {
		if t >= 0 {
			b = appendCBORHead(b, cborUint, uint64(t))
		} else {
			b = appendCBORHead(b, cborNeg, uint64(-1-int64(t)))
		}
	}
	salt := first && extra.CacheSalt != ""
	switch n := b2u(extra.LoRAName != "") + b2u(salt); n {
	case 0:
		b = append(b, cborNull)
	default:
		b = appendCBORHead(b, cborArray, n)
		if extra.LoRAName != "" {
			b = appendCBORHead(b, cborText, uint64(len(extra.LoRAName)))
			b = append(b, extra.LoRAName...)
		}
		if salt {
			b = appendCBORHead(b, cborText, uint64(len(extra.CacheSalt)))
			b = append(b, extra.CacheSalt...)
		}
	}
	x.buf = b
	return sha256.Sum256(b)
}

// VLLMKeys appends to dst vLLM's sha256_cbor keys of the full blocks of tokens
// (len(tokens)/blockTokens of them) in namespace extra, the first block's parent being none
// (VLLMNoneHash of the fleet's seed): what a router that follows vLLM replicas computes, and
// what a manager keying blocks the vLLM way accepts as Prompt.Keys. blockTokens must be
// positive; otherwise dst comes back unchanged.
func VLLMKeys(dst []Key, none Key, extra VLLMExtra, blockTokens int, tokens []Token) []Key {
	if blockTokens <= 0 {
		return dst
	}
	var x VLLMHasher
	parent := none
	for i := 0; i+blockTokens <= len(tokens); i += blockTokens {
		parent = x.Next(parent, tokens[i:i+blockTokens], extra, i == 0)
		dst = append(dst, parent)
	}
	return dst
}

// CBOR major types (shifted into the initial byte) and the simple value null.
const (
	cborUint  = 0 << 5
	cborNeg   = 1 << 5
	cborBytes = 2 << 5
	cborText  = 3 << 5
	cborArray = 4 << 5
	cborNull  = 0xf6
)

// appendCBORHead appends the head of a CBOR item of major type major and argument n (a value,
// a length or a count) in its shortest form, as canonical CBOR requires.
func appendCBORHead(b []byte, major byte, n uint64) []byte {
	switch {
	case n < 24:
		return append(b, major|byte(n))
	case n <= 0xff:
		return append(b, major|24, byte(n))
	case n <= 0xffff:
		return binary.BigEndian.AppendUint16(append(b, major|25), uint16(n))
	case n <= 0xffffffff:
		return binary.BigEndian.AppendUint32(append(b, major|26), uint32(n))
	}
	return binary.BigEndian.AppendUint64(append(b, major|27), n)
}

// b2u returns 1 for true and 0 for false.
func b2u(v bool) uint64 {
	if v {
		return 1
	}
	return 0
}
