package prefix

import "strconv"

// Scheme says how a cache computes its block keys. The zero Scheme is pagedkv's own chain
// (Root, then Hasher.Next: SHA-256 of the parent key and the ids). A Scheme with VLLM set keys
// blocks as vLLM does under its sha256_cbor setting (VLLMHasher), so that a router that follows
// vLLM replicas and pagedkv replicas sees one key space, and the keys such a router computes
// (VLLMKeys) are accepted as Prompt.Keys as they are.
//
// The namespace maps to vLLM's extra keys: Namespace.Adapter to the LoRA name LoRANames gives
// it (an adapter missing from the map is named by its decimal id; adapter 0 is the base model
// and has no name), Namespace.Salt to the cache salt of the sequence's first block. A name must
// not be empty: vLLM hashes an empty lora_name as a LoRA's, and a key without a name is the base
// model's (kvcache refuses such a map).
type Scheme struct {
	VLLM      bool
	Seed      string            // vLLM's PYTHONHASHSEED of the fleet: the NONE_HASH seed
	LoRANames map[uint64]string // adapter id to vLLM's lora_name
}

// Keyer computes block keys under a Scheme, reusing its buffers so that it allocates nothing
// once warm. The zero Keyer computes pagedkv's chain. It is not safe for concurrent use.
type Keyer struct {
	scheme Scheme
	none   Key
	sha    Hasher
	vllm   VLLMHasher
	named  map[uint64]string // adapters missing from LoRANames, named once; at most maxNamed
}

// maxNamed bounds the adapters a Keyer keeps the names of (Keyer.named).
const maxNamed = 1024

// NewKeyer returns a Keyer for scheme s. The Keyer keeps s's LoRANames map: do not change it
// afterwards.
func NewKeyer(s Scheme) *Keyer {
	k := &Keyer{scheme: s}
	if s.VLLM {
		k.none = VLLMNoneHash(s.Seed)
	}
	return k
}

// Scheme returns the scheme k computes. A nil Keyer computes the zero Scheme.
func (k *Keyer) Scheme() Scheme {
	if k == nil {
		return Scheme{}
	}
	return k.scheme
}

// Root returns the parent key of the first block of a sequence in namespace ns, for blocks of
// blockTokens tokens: Root(ns, blockTokens), or vLLM's NONE_HASH (vLLM folds the namespace into
// every block's hash instead).
func (k *Keyer) Root(ns Namespace, blockTokens int) Key {
	if k != nil && k.scheme.VLLM {
		return k.none
	}
	return Root(ns, blockTokens)
}

// Next returns the key of block i (from 0) of a sequence in namespace ns, holding tokens, whose
// parent (the key of block i-1, or the Root) is parent. A nil Keyer works, allocating its
// buffer each call.
func (k *Keyer) Next(ns Namespace, i int, parent Key, tokens []Token) Key {
	if k == nil {
		return (*Hasher)(nil).Next(parent, tokens)
	}
	if !k.scheme.VLLM {
		return k.sha.Next(parent, tokens)
	}
	return k.vllm.Next(parent, tokens, k.extra(ns), i == 0)
}

// extra returns vLLM's extra keys of namespace ns.
func (k *Keyer) extra(ns Namespace) VLLMExtra {
	x := VLLMExtra{CacheSalt: ns.Salt}
	if ns.Adapter != 0 {
		name, ok := k.scheme.LoRANames[ns.Adapter]
		if !ok {
			if name, ok = k.named[ns.Adapter]; !ok {
				if k.named == nil {
					k.named = make(map[uint64]string)
				}
				if len(k.named) >= maxNamed { // the ids come from callers: keep a bounded few
					clear(k.named)
				}
				name = strconv.FormatUint(ns.Adapter, 10)
				k.named[ns.Adapter] = name
			}
		}
		x.LoRAName = name
	}
	return x
}

// Keys appends to dst the keys of the full blocks of tokens in namespace ns under k's scheme:
// what a router computes for a replica keyed this way. blockTokens must be positive; otherwise
// dst comes back unchanged.
func (k *Keyer) Keys(dst []Key, ns Namespace, blockTokens int, tokens []Token) []Key {
	if blockTokens <= 0 {
		return dst
	}
	parent := k.Root(ns, blockTokens)
	for i := 0; (i+1)*blockTokens <= len(tokens); i++ {
		parent = k.Next(ns, i, parent, tokens[i*blockTokens:(i+1)*blockTokens])
		dst = append(dst, parent)
	}
	return dst
}
