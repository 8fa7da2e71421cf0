package prefix

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/require"
)

// FuzzJournal writes events built from the input into a Journal (Append, ExtendRemoved, Seal,
// DropUnsealed, Reset) beside a model, a plain slice of the events, and checks that decoding
// the journal gives back the model exactly: every field, over the full range of each (negative
// ints, the largest uint64s, codes and inline strings, empty and nil slices).
func FuzzJournal(f *testing.F) {
	f.Add([]byte{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20})
	f.Add([]byte{1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 2, 2, 5, 3, 1, 4, 1, 1, 6, 0, 7})
	f.Add([]byte{1, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 1, 9, 1, 9, 3, 9, 4, 9, 5})
	f.Fuzz(func(t *testing.T, in []byte) {
		next := func() byte {
			if len(in) == 0 {
				return 0
			}
			b := in[0]
			in = in[1:]
			return b
		}
		u64 := func() uint64 {
			var b [8]byte
			for i := range b {
				b[i] = next()
			}
			return binary.LittleEndian.Uint64(b[:])
		}
		strs := []string{"", MediumGPU, MediumCPU, "DISK", "CLUSTER", "sliding_window", "mamba", "tier-x", "\x00", "GPU "}
		var j Journal
		var model, sealed []Event
		for len(in) > 0 {
			switch op := next() % 8; op {
			case 0, 1, 2: // an event
				ev := Event{Kind: EventKind(next()), ParentIsRoot: next()%2 == 1, HasGroup: next()%2 == 1,
					Medium: strs[int(next())%len(strs)], GroupKind: strs[int(next())%len(strs)]}
				fields := next()
				if fields&1 != 0 {
					ev.BlockSize = int(u64())
				}
				if fields&2 != 0 {
					ev.Adapter = u64()
				}
				if fields&4 != 0 {
					ev.Lost = u64()
				}
				if fields&8 != 0 {
					ev.Group = int(u64())
				}
				if fields&16 != 0 {
					ev.SlidingWindow = int(u64())
				}
				if fields&32 != 0 {
					ev.Parent = Key{next(), 31: next()}
				}
				if n := int(next() % 5); n > 0 {
					ev.Keys = make([]Key, n)
					for i := range ev.Keys {
						ev.Keys[i] = Key{next(), 31: next()}
					}
				}
				if n := int(next() % 40); n > 0 {
					ev.Tokens = make([]Token, n)
					for i := range ev.Tokens {
						ev.Tokens[i] = Token(u64())
					}
				}
				j.Append(&ev)
				model = append(model, ev)
			case 3: // a removal that may join the last event
				k, medium := Key{next(), 31: next()}, strs[int(next())%len(strs)]
				last := len(model) - 1
				joins := len(model) > len(sealed) && model[last].Kind == BlockRemoved && len(model[last].Tokens) == 0 &&
					model[last].Medium == medium
				require.Equal(t, joins, j.ExtendRemoved(k, medium), "ExtendRemoved after %+v", model)
				if joins {
					model[last].Keys = append(append([]Key(nil), model[last].Keys...), k)
				}
			case 4:
				j.Seal()
				sealed = append([]Event(nil), model...)
			case 5:
				j.DropUnsealed()
				model = append([]Event(nil), sealed...)
			case 6:
				if next()%4 == 0 {
					j.Reset()
					model, sealed = nil, nil
				}
			case 7: // decode now, and go on writing
				require.Equal(t, model, j.appendTo(nil))
			}
			require.Equal(t, len(model), j.Len())
			require.Equal(t, len(model)-len(sealed), j.Unsealed())
		}
		got := j.appendTo([]Event{{Kind: AllBlocksCleared}})
		require.Equal(t, append([]Event{{Kind: AllBlocksCleared}}, model...), got)
		var copied Journal
		copied.appendJournal(&j)
		copied.appendJournal(&j)
		require.Equal(t, append(append([]Event(nil), model...), model...), copied.appendTo(nil))
	})
}

// A decoded event's slices are its own: writing the journal again, or another event's keys,
// changes none of them.
func TestJournalDecodedSlicesAreTheReaders(t *testing.T) {
	var j Journal
	j.Append(&Event{Kind: BlockStored, Keys: []Key{{1}, {2}}, Tokens: []Token{1, 2, 3}})
	j.Append(&Event{Kind: BlockRemoved, Keys: []Key{{3}}})
	evs := j.appendTo(nil)
	require.Len(t, evs, 2)
	evs[0].Keys = append(evs[0].Keys, Key{9}) // capacity ends at the slice: a new array
	evs[0].Tokens = append(evs[0].Tokens, 9)
	require.Equal(t, []Key{{3}}, evs[1].Keys)
	j.Reset()
	j.Append(&Event{Kind: BlockStored, Keys: []Key{{7}, {7}}, Tokens: []Token{7, 7, 7}})
	require.Equal(t, []Key{{1}, {2}, {9}}, evs[0].Keys)
	require.Equal(t, []Token{1, 2, 3, 9}, evs[0].Tokens)
}

// BenchmarkJournal times what the append path pays per filled block with a subscriber: a
// one-block BlockStored (16 token ids) and a BlockRemoved written to a Journal, which is reset
// every 256 events as a manager's is handed over.
func BenchmarkJournal(b *testing.B) {
	keys, tokens := []Key{{1}}, make([]Token, 16)
	var j Journal
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		if j.Len() >= 256 {
			j.Reset()
		}
		j.Append(&Event{Kind: BlockStored, Keys: keys, Parent: Key{2}, Tokens: tokens, BlockSize: 16, Medium: MediumGPU})
		if !j.ExtendRemoved(Key{3}, MediumGPU) {
			removed := [1]Key{{3}}
			j.Append(&Event{Kind: BlockRemoved, Keys: removed[:], Medium: MediumGPU})
		}
		j.Seal()
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N), "ns/block")
}

// FuzzJournalDecode decodes arbitrary bytes as a Journal's records, as a Journal misused (copied
// and written through both copies) would hold: decoding never panics, and a record that does not
// parse ends it with one EventsLost.
func FuzzJournalDecode(f *testing.F) {
	var j Journal
	j.Append(&Event{Kind: BlockStored, Keys: []Key{{1}}, Tokens: []Token{1, 2}, Medium: "NVME", GroupKind: "x", BlockSize: 2})
	j.Append(&Event{Kind: BlockRemoved, Keys: []Key{{2}}, Parent: Key{3}, Group: 7})
	f.Add(j.b, uint16(2), uint16(2), uint16(2))
	f.Add(j.b[:30], uint16(2), uint16(2), uint16(2))
	f.Fuzz(func(t *testing.T, b []byte, n, keys, tokens uint16) {
		j := Journal{b: b, at: journalMark{n: int(n), keys: int(keys), tokens: int(tokens), bytes: len(b)}}
		evs := j.appendTo(nil)
		require.LessOrEqual(t, len(evs), len(b)/recHeader+1, "every event but a final loss is a record of 24 bytes or more")
	})
}

// A Journal copied and then written through both copies does not break its reader: the
// subscription reports a loss instead of panicking.
func TestJournalCopiedAndWrittenTwice(t *testing.T) {
	var f Feed
	s, err := f.Subscribe(16)
	require.NoError(t, err)
	var j Journal
	j.b = make([]byte, 0, 4096)
	j.Append(&Event{Kind: BlockStored, Keys: []Key{{1}}})
	c := j
	c.Append(&Event{Kind: BlockStored, Keys: []Key{{2}, {3}, {4}}, Tokens: make([]Token, 40)})
	j.Append(&Event{Kind: BlockRemoved, Keys: []Key{{5}}})
	f.HandJournal(&c) // c's second record lies under j's
	evs := s.Read(nil)
	require.NotEmpty(t, evs)
	require.Equal(t, Key{1}, evs[0].Keys[0], "the record written before the copy stands")
	require.Equal(t, EventsLost, evs[len(evs)-1].Kind)
}

// Every string of codes has its own code, which decodes back to it, and any other string is
// written inline.
func TestJournalCodes(t *testing.T) {
	for i, c := range codes {
		require.Equal(t, byte(i+1), code(c), c)
		got, _, ok := decodeString(nil, 0, code(c))
		require.True(t, ok)
		require.Equal(t, c, got)
	}
	require.Equal(t, byte(0), code(""))
	require.Equal(t, byte(inline), code("gpu"))
	require.Equal(t, byte(inline), code("GPU "))
}

// Key.zero sees every byte, wherever the Key lies: a Key is an array of bytes, which need not
// be 8-byte aligned.
func TestKeyZero(t *testing.T) {
	var buf [1 + len(Key{})]byte
	k := (*Key)(buf[1:])
	require.True(t, k.zero())
	for i := range k {
		k[i] = 0x80
		require.False(t, k.zero(), "byte %d", i)
		k[i] = 0
	}
}
