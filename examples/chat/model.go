package main

import (
	"encoding/binary"
	"strings"
	"unicode"

	"github.com/pagedkv/pagedkv/kernels"
	"github.com/pagedkv/pagedkv/kvcache"
)

// The model is tiny and deterministic, but everything it says it reads back out of the KV
// cache through the block table, with attention:
//
//   - Each token's key is a pseudo-random unit vector naming where the token stands: its turn,
//     whether the user or the bot said it, and its index in that part. Its value holds its
//     character's 8 bits as +-1.
//   - The answer to a user message is the message reversed with its letters' case swapped. To
//     say answer character i the model queries layer 0 with the key of user character n-1-i of
//     this turn: attention finds that one token among all the conversation's tokens, and the
//     signs of its value are the character.
//   - From the second turn on, the answer goes on with " (before: ...)": the first part of the
//     previous answer, read through layer 1 with the keys of the bot's tokens of the last turn.
//
// So a block table that points one block astray shows up as wrong letters.
//
// The hybrid model (-hybrid) has four layers, gpt-oss style: the odd ones full attention, the
// even ones a sliding window of 64 tokens that also reads the first 4 tokens (the sinks). Layers
// 1 and 3 play the roles of layers 0 and 1 above. The window layers end every answer with
// " [ssss|oooo]" (see windowed): layer 0 reads the conversation's sink tokens, and layer 2 the
// four oldest tokens inside the window, the tokens at its very edge. So the window group's
// table must hold the sink block and the block at the edge, and attention must use the
// group's mask: a mask without the sinks or short of the window misses the token it looks for,
// and one wider than the window reads the places of blocks the group freed.
const (
	headDim = 64
	layers  = 2
	scale   = 40 // softmax sharpness: a matching key scores 40, others about +-5
	userTok = 0
	botTok  = 1

	hybridLayers = 4
	window       = 64 // the window layers' reach, in tokens
	sinks        = 4  // leading tokens the window layers always read
	edgeTokens   = 4  // the oldest tokens of the window the answer repeats
	windowedLen  = len(" [") + sinks + len("|") + edgeTokens + len("]")
)

// layer names one of the model's layers by its group in the cache and its index in the group
// (the layer Manager.LayerBase takes).
type layer struct{ group, index int }

// roles are the layers each part of an answer is read from.
type roles struct{ reverse, before, sinks, edge layer }

var (
	// plainRoles: one group, layers 0 and 1.
	plainRoles = roles{reverse: layer{0, 0}, before: layer{0, 1}}
	// hybridRoles: group 0 is full attention (model layers 1, 3), group 1 the window (0, 2).
	hybridRoles = roles{reverse: layer{0, 0}, before: layer{0, 1}, sinks: layer{1, 0}, edge: layer{1, 1}}
)

// hybridGeometry is the hybrid model's cache: a full-attention group and a sliding-window group
// of 16-token blocks, one fp16 KV head of 64 in every layer.
func hybridGeometry() kvcache.Geometry {
	full := kvcache.LayerGroup{Name: "full", Layers: []int{1, 3}, Kind: kvcache.FullAttention,
		KVHeads: 1, KHeadDim: headDim, VHeadDim: headDim, DType: kvcache.F16, BlockTokens: 16}
	win := full
	win.Name, win.Layers, win.Kind, win.Window, win.Sinks = "window", []int{0, 2}, kvcache.SlidingWindow, window, sinks
	return kvcache.Geometry{Model: "chat-hybrid", Layers: hybridLayers, Groups: []kvcache.LayerGroup{full, win}}
}

// key returns the key (and query) vector of a token position as fp16 bytes: 64 entries of
// +-1/8 chosen by a hash of (turn, who, index).
func key(turn, who, index int) []byte {
	x := uint64(turn)<<32 ^ uint64(who)<<28 ^ uint64(index) ^ 0x9e3779b97f4a7c15
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	b := make([]byte, 2*headDim)
	for d := range headDim {
		v := float32(0.125)
		if x>>d&1 == 1 {
			v = -0.125
		}
		binary.LittleEndian.PutUint16(b[2*d:], kernels.HalfFromFloat32(v))
	}
	return b
}

// value returns the value vector of a character: its bits as +-1 in the first 8 entries.
func value(c byte) []byte {
	b := make([]byte, 2*headDim)
	for d := range 8 {
		v := float32(-1)
		if c>>d&1 == 1 {
			v = 1
		}
		binary.LittleEndian.PutUint16(b[2*d:], kernels.HalfFromFloat32(v))
	}
	return b
}

// decode turns an attention output (fp32) back into a character by the signs of its first 8
// entries.
func decode(out []float32) byte {
	var c byte
	for d := range 8 {
		if out[d] > 0 {
			c |= 1 << d
		}
	}
	return c
}

func swapCase(c byte) byte {
	r := rune(c)
	switch {
	case unicode.IsUpper(r):
		return byte(unicode.ToLower(r))
	case unicode.IsLower(r):
		return byte(unicode.ToUpper(r))
	}
	return c
}

// expected is what a right answer says, computed from the text alone, for checking.
func expected(msg string, prevFirst string) (answer, first string) {
	b := []byte(msg)
	var s strings.Builder
	for i := len(b) - 1; i >= 0; i-- {
		s.WriteByte(swapCase(b[i]))
	}
	first = s.String()
	if prevFirst != "" {
		s.WriteString(" (before: " + prevFirst + ")")
	}
	return s.String(), first
}

// windowed is what the window layers add to an answer, given the conversation so far (every
// token one character): " [", the sink tokens, "|", the four oldest tokens inside the window at
// that point, "]". The window of the token after "|" reads back to max(0, length-window), and
// each later token's window starts one further, so the k-th of the four stays inside it.
func windowed(conv string) string {
	s := conv + " ["
	s += s[:sinks] + "|"
	oldest := max(0, len(s)-window)
	s += s[oldest:oldest+edgeTokens] + "]"
	return s[len(conv):]
}
