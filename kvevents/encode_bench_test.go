package kvevents

import (
	"math"
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/pagedkv/pagedkv/prefix"
)

// BenchmarkEncodeBatch times the encoding of a decode step's batch: 512 one-block BlockStored
// events of 16 token ids (ids past 65,535, as in a long run) each followed by a one-block
// BlockRemoved, in vLLM's array encoding. One op is a batch; ns/block is per stored block.
func BenchmarkEncodeBatch(b *testing.B) {
	const blocks = 512
	tokens := make([]prefix.Token, 16*blocks)
	for i := range tokens {
		tokens[i] = prefix.Token(100000 + i*7919%151000)
	}
	keys := prefix.Keys(nil, prefix.Namespace{}, 16, tokens)
	events := make([]prefix.Event, 0, 2*blocks)
	for i := range blocks {
		events = append(events,
			prefix.Event{Kind: prefix.BlockStored, Keys: keys[i : i+1], Parent: keys[max(i-1, 0)], ParentIsRoot: i == 0,
				Tokens: tokens[16*i : 16*i+16], BlockSize: 16, Medium: prefix.MediumGPU},
			prefix.Event{Kind: prefix.BlockRemoved, Keys: keys[i : i+1], Medium: prefix.MediumGPU})
	}
	var e encoder
	var buf []byte
	b.ReportAllocs()
	for b.Loop() {
		buf, _, _ = e.appendBatch(buf[:0], 1, events)
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*blocks), "ns/block")
	b.ReportMetric(float64(len(buf))/blocks, "bytes/block")
}

// appendTokens writes every id as appendInt does, at each boundary of MessagePack's integer
// forms.
func TestAppendTokensMatchesAppendInt(t *testing.T) {
	ids := []prefix.Token{math.MinInt32, math.MinInt32 + 1, -32769, -32768, -32767, -129, -128, -127, -33, -32, -31, -1,
		0, 1, 127, 128, 255, 256, 65535, 65536, math.MaxInt32 - 1, math.MaxInt32}
	want := appendArrayLen([]byte{0xaa}, len(ids))
	for _, id := range ids {
		want = appendInt(want, int64(id))
	}
	assert.Equal(t, want, appendTokens([]byte{0xaa}, ids))
	for i := range ids { // one at a time, into a buffer with no room to spare
		assert.Equal(t, appendInt(appendArrayLen(nil, 1), int64(ids[i])), appendTokens(nil, ids[i:i+1]), "id %d", ids[i])
	}
	assert.Equal(t, []byte{0x90}, appendTokens(nil, nil))
}
