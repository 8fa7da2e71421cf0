// Package prefix is the content-addressed side of the KV cache that runtimes and routers see:
// the keys of full blocks, the namespaces that separate tenants, and the events routers follow.
// It knows nothing of memory, devices or pages; kvcache decides which blocks hold what and when
// to evict (its key index is internal/keyindex).
//
// A block's Key is SHA-256 over its parent block's key and its token ids; the first block's
// parent is the Root of a Namespace (an adapter id and a per-tenant salt, with the block size),
// so sequences share blocks only when their namespaces and every earlier token agree. This is
// vLLM's block hash (hash(parent, tokens, extra keys), SHA-256 by default) with the extra keys
// folded into the root.
//
// A fleet that mixes pagedkv and vLLM replicas behind one router keys blocks as vLLM does
// instead (VLLMKeys, VLLMHasher): vLLM's sha256_cbor block hash, SHA-256 of the canonical CBOR
// of [parent key, token ids, extra keys]. The chain starts at VLLMNoneHash(seed), where seed is
// the PYTHONHASHSEED the vLLM replicas run with; without it vLLM draws the start at random and
// no other process can compute its keys. The namespace goes into the extra keys: the LoRA
// adapter's name (the name the runtime gives Namespace.Adapter) on every block, Namespace.Salt
// as vLLM's cache_salt on the first block only. The block size is not hashed: the router and
// every replica must use the same.
//
// Events (BlockStored, BlockRemoved, AllBlocksCleared) go to Subscriptions, each a bounded
// queue read without blocking the writer: a subscriber that falls behind by more than its
// queue loses the queued events and reads EventsLost first.
//
// Concurrency: a Hasher is not safe for concurrent use; a Feed and its Subscriptions are.
package prefix
