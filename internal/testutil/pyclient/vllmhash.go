package pyclient

// VLLMHashPy computes, from vLLM's definition (vllm/v1/core/kv_cache_utils.py: init_none_hash,
// hash_block_tokens, generate_block_hash_extra_keys; vllm/utils/hashing.py: sha256_cbor), the
// block hashes of each vector it reads as JSON ({"seed", "lora_name" or null, "cache_salt",
// "block_size", "tokens"}), and prints them, a list of hex keys per vector, as JSON.
const VLLMHashPy = `
import hashlib, json, sys
import cbor2

def sha256_cbor(obj):
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()

out = []
for v in json.load(sys.stdin):
    none_hash = sha256_cbor(v["seed"])
    bs, toks = v["block_size"], v["tokens"]
    parent, keys = None, []
    for start in range(0, len(toks) - bs + 1, bs):
        extra = []
        if v["lora_name"] is not None:
            extra.append(v["lora_name"])
        if start == 0 and v["cache_salt"]:
            extra.append(v["cache_salt"])
        extra = tuple(extra) if extra else None
        if not parent:
            parent = none_hash
        parent = sha256_cbor((parent, tuple(toks[start:start + bs]), extra))
        keys.append(parent.hex())
    out.append(keys)
json.dump(out, sys.stdout)
`
