package prefix

import (
	"encoding/hex"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/testutil/pyclient"
)

func hexKey(t *testing.T, s string) Key {
	t.Helper()
	b, err := hex.DecodeString(s)
	require.NoError(t, err)
	require.Len(t, b, 32)
	return Key(b)
}

// Keys computed once by vLLM's definition in Python (hashlib.sha256(cbor2.dumps(x,
// canonical=True)), NONE_HASH for PYTHONHASHSEED=0), so that a machine without Python still
// checks the chain, the seed and the extra keys.
func TestVLLMKeysGolden(t *testing.T) {
	none := VLLMNoneHash("0")
	assert.Equal(t, hexKey(t, "4e1195df020de59e0d65a33a4279f1183e7ae4e5d980e309f8b55adff2e61c3e"), none)
	keys := VLLMKeys(nil, none, VLLMExtra{LoRAName: "sql-lora", CacheSalt: "tenant-a"}, 4, []Token{1, 2, 3, 4, 5, 6, 7, 8, 9})
	require.Len(t, keys, 2)
	assert.Equal(t, hexKey(t, "69d9ff0e1706ad1bdfeabacb1828e738e1cab86bd5508f7d7c7a2dbd3a3c3498"), keys[0], "LoRA name and salt")
	assert.Equal(t, hexKey(t, "ec4ace2bc808c7d3e9dd16b91c167b6db0fcd5268b89547db2be7f79c91e34c4"), keys[1], "LoRA name alone after the first block")
	assert.Equal(t, hexKey(t, "c9d58ba695280d69b243e1e0df813136ca9196b286fb1a021e0b2e028ef071cb"), VLLMKeys(nil, none, VLLMExtra{}, 4, []Token{1, 2, 3, 4})[0], "no extra keys: null")

	var x VLLMHasher
	assert.Equal(t, keys[1], x.Next(keys[0], []Token{5, 6, 7, 8}, VLLMExtra{LoRAName: "sql-lora", CacheSalt: "tenant-a"}, false))
	assert.Equal(t, keys[1], (*VLLMHasher)(nil).Next(keys[0], []Token{5, 6, 7, 8}, VLLMExtra{LoRAName: "sql-lora"}, true), "a nil hasher works")
	assert.Equal(t, []Key{none}, VLLMKeys([]Key{none}, none, VLLMExtra{}, 0, []Token{1}), "a block size of 0 appends nothing")
	assert.Empty(t, VLLMKeys(nil, none, VLLMExtra{}, 4, []Token{1, 2, 3}), "no full block")
	assert.NotEqual(t, VLLMNoneHash("1"), none)
}

// A warm VLLMHasher allocates nothing.
func TestVLLMHasherAllocs(t *testing.T) {
	var x VLLMHasher
	tokens := make([]Token, 16)
	x.Next(Key{}, tokens, VLLMExtra{LoRAName: "l", CacheSalt: "s"}, true)
	assert.Zero(t, testing.AllocsPerRun(100, func() { x.Next(Key{}, tokens, VLLMExtra{LoRAName: "l", CacheSalt: "s"}, true) }))
}

// Block hashes equal vLLM's sha256_cbor computed in Python (hashlib and Debian's cbor2) from the
// same tokens, on vectors with LoRA names and salts, and with every width of CBOR head: token
// ids, lengths and counts below 24, to a byte, two bytes and four bytes, and negative ids.
func TestVLLMKeysMatchPython(t *testing.T) {
	pyclient.Require(t, "cbor2")
	type vector struct {
		Seed      string  `json:"seed"`
		LoRAName  *string `json:"lora_name"`
		CacheSalt string  `json:"cache_salt"`
		BlockSize int     `json:"block_size"`
		Tokens    []Token `json:"tokens"`
	}
	str := func(s string) *string { return &s }
	edge := []Token{0, 1, 23, 24, 255, 256, 65535, 65536, 1<<31 - 1, -1, -24, -25, -256, -257, -1 << 31, 151643}
	long := make([]Token, 600)
	for i := range long {
		long[i] = Token(i * 7919 % 200003)
	}
	vectors := []vector{
		{Seed: "0", BlockSize: 4, Tokens: edge},
		{Seed: "0", LoRAName: str("sql-lora"), BlockSize: 4, Tokens: edge},
		{Seed: "0", CacheSalt: "tenant-a", BlockSize: 4, Tokens: edge},
		{Seed: "0", LoRAName: str("sql-lora"), CacheSalt: "tenant-a", BlockSize: 16, Tokens: long},
		{Seed: "", LoRAName: str("adapter-é-Ω"), CacheSalt: strings.Repeat("s", 300), BlockSize: 24, Tokens: long},
		{Seed: "12345", LoRAName: str(strings.Repeat("l", 23)), CacheSalt: strings.Repeat("x", 24), BlockSize: 300, Tokens: long},
		{Seed: strings.Repeat("seed", 70), LoRAName: str(strings.Repeat("n", 256)), BlockSize: 1, Tokens: edge},
		{Seed: "0", BlockSize: 23, Tokens: long},
		{Seed: "0", BlockSize: 256, Tokens: long},
	}
	in, err := json.Marshal(vectors)
	require.NoError(t, err)
	var want [][]string
	require.NoError(t, json.Unmarshal(pyclient.Run(t, time.Minute, pyclient.VLLMHashPy, in), &want))
	require.Len(t, want, len(vectors))
	for i, v := range vectors {
		extra := VLLMExtra{CacheSalt: v.CacheSalt}
		if v.LoRAName != nil {
			extra.LoRAName = *v.LoRAName
		}
		got := VLLMKeys(nil, VLLMNoneHash(v.Seed), extra, v.BlockSize, v.Tokens)
		require.Len(t, got, len(want[i]), "vector %d", i)
		require.NotEmpty(t, got, "vector %d", i)
		for j := range got {
			assert.Equal(t, want[i][j], got[j].String(), "vector %d block %d", i, j)
		}
	}
}
