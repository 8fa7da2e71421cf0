package main

import (
	"encoding/binary"
	"strings"
	"unicode"

	"github.com/pagedkv/pagedkv/kernels"
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
const (
	headDim = 64
	layers  = 2
	scale   = 40 // softmax sharpness: a matching key scores 40, others about +-5
	userTok = 0
	botTok  = 1
)

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
