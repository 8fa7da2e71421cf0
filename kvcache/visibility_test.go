package kvcache_test

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/vmm"
)

func promptOf(n int, seed uint32) []kvcache.TokenID {
	p := make([]kvcache.TokenID, n)
	for i := range p {
		p[i] = kvcache.TokenID(seed*1000 + uint32(i))
	}
	return p
}

// Without WaitForWrites a block is a hit the moment it fills; with it, only once MarkWritten
// says its K/V is written, and the BlockStored event goes out then.
func TestWaitForWrites(t *testing.T) {
	dev := hostDevice(t, 4096)
	p := promptOf(13, 1) // 3 whole blocks of 4, and one token

	m := newManager(t, dev, tinyConfig())
	_, err := m.StartSequence(1, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	_, err = m.AppendTokenIDs(1, p, nil)
	require.NoError(t, err)
	hit, err := m.StartSequence(2, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	require.Equal(t, 12, hit, "the default: blocks nobody wrote yet are hits at once")

	cfg := tinyConfig()
	cfg.WaitForWrites = true
	w := newManager(t, dev, cfg)
	sub, err := w.Subscribe(16)
	require.NoError(t, err)
	_, err = w.StartSequence(1, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	_, err = w.AppendTokenIDs(1, p, nil)
	require.NoError(t, err)
	require.Zero(t, w.Stats().Prefix.CachedBlocks)
	hit, err = w.StartSequence(2, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	require.Zero(t, hit, "nothing is written yet")
	require.Empty(t, sub.Read(nil))

	require.NoError(t, w.MarkWritten(1, 9)) // two whole blocks and a token of the third
	require.Equal(t, 2, w.Stats().Prefix.CachedBlocks)
	ev := sub.Read(nil)
	require.Len(t, ev, 1)
	require.Equal(t, prefix.BlockStored, ev[0].Kind)
	require.Len(t, ev[0].Keys, 2)
	hit, err = w.StartSequence(3, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	require.Equal(t, 8, hit)
	require.NoError(t, w.MarkWritten(1, 4), "an earlier mark changes nothing")
	require.NoError(t, w.MarkWritten(1, 13))
	require.Equal(t, 3, w.Stats().Prefix.CachedBlocks)
	hit, err = w.StartSequence(4, kvcache.Prompt{Tokens: p})
	require.NoError(t, err)
	require.Equal(t, 12, hit)

	// A hit counts as written: sequence 4 appends the rest and marks it.
	_, err = w.AppendTokenIDs(4, p[12:], nil)
	require.NoError(t, err)
	require.NoError(t, w.Truncate(1, 7), "a truncation pulls the mark back with the tokens")
	_, err = w.AppendTokenIDs(1, p[6:], nil)
	require.NoError(t, err)
	require.Equal(t, 3, w.Stats().Prefix.CachedBlocks, "blocks 2 and 3 of sequence 1 wait for their mark again")
	require.NoError(t, w.Verify())

	// Bad input changes nothing.
	var ce *kvcache.CountError
	require.ErrorAs(t, w.MarkWritten(1, 14), &ce)
	require.Equal(t, 13, ce.Max)
	require.ErrorAs(t, w.MarkWritten(1, -1), &ce)
	require.ErrorIs(t, w.MarkWritten(99, 0), kvcache.ErrUnknownSequence)
	require.ErrorIs(t, (*kvcache.Manager)(nil).MarkWritten(1, 0), kvcache.ErrInvalidArgument)
	require.NoError(t, w.Verify())
}

// marker is what the test writes as token pos's K in layer 0: its position and a hash of the
// ids up to it, so a block holding another prefix's K, or nothing, reads back wrong.
func marker(ids []kvcache.TokenID, pos int) [16]byte {
	h := uint64(14695981039346656037)
	for _, id := range ids[:pos+1] {
		h = (h ^ uint64(id)) * 1099511628211
	}
	var b [16]byte
	binary.LittleEndian.PutUint64(b[:], uint64(pos)+1)
	binary.LittleEndian.PutUint64(b[8:], h)
	return b
}

// Six goroutines start requests on four shared system prompts, append the rest of each prompt,
// write its K/V, mark it written, decode a few tokens the same way and read every token back
// through the sequence's slots. Under WaitForWrites no request ever reads K/V that was not
// written for its own prefix: a hit is only ever served from written blocks. (Without it a
// request can hit a block another goroutine has appended but not yet written; the
// deterministic half of TestWaitForWrites shows that.)
func TestConcurrentWritersSeeOnlyWrittenBlocks(t *testing.T) {
	dev := hostDevice(t, 4096)
	cfg := tinyConfig()
	cfg.WaitForWrites, cfg.Strict = true, true
	m := newManager(t, dev, cfg)
	c := m.Config()
	write := func(seq kvcache.SeqID, ids []kvcache.TokenID, from int, slots []int64) error {
		for i, s := range slots {
			b := marker(ids, from+i)
			a := m.BlockAddr(0, 0, int32(s/int64(c.BlockTokens))) + vmm.Addr(uint64(s%int64(c.BlockTokens))*c.TokenBytes())
			if err := dev.CopyIn(a, b[:]); err != nil {
				return err
			}
		}
		return m.MarkWritten(seq, from+len(slots))
	}
	// Each system prompt is written once and held by a sequence, so its blocks stay cached and
	// every request on it hits them.
	systems := make([][]kvcache.TokenID, 4)
	for i := range systems {
		systems[i] = promptOf(12, uint32(i+1))
		seq := kvcache.SeqID(1000 + i)
		_, err := m.StartSequence(seq, kvcache.Prompt{Tokens: systems[i]})
		require.NoError(t, err)
		slots, err := m.AppendTokenIDs(seq, systems[i], nil)
		require.NoError(t, err)
		require.NoError(t, write(seq, systems[i], 0, slots))
	}
	const workers, requests = 6, 150
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 1))
			var slots []int64
			buf := make([]byte, 16)
			for i := range requests {
				seq := kvcache.SeqID(w*requests + i)
				sys := systems[r.IntN(len(systems))]
				p := append(append([]kvcache.TokenID(nil), sys...), promptOf(1+r.IntN(9), uint32(10+r.IntN(3)))...)
				hit, err := m.StartSequence(seq, kvcache.Prompt{Tokens: p})
				if err != nil {
					errs <- err
					return
				}
				ids := p
				if slots, err = m.AppendTokenIDs(seq, p[hit:], slots[:0]); err == nil {
					err = write(seq, ids, hit, slots)
				}
				for d := 0; err == nil && d < 3; d++ {
					ids = append(ids, kvcache.TokenID(5000+r.IntN(4)))
					if slots, err = m.AppendTokenIDs(seq, ids[len(ids)-1:], slots[:0]); err == nil {
						err = write(seq, ids, len(ids)-1, slots)
					}
				}
				if err == nil {
					slots, err = m.Slots(seq, 0, len(ids), slots[:0])
				}
				for pos, s := range slots {
					if err != nil {
						break
					}
					a := m.BlockAddr(0, 0, int32(s/int64(c.BlockTokens))) + vmm.Addr(uint64(s%int64(c.BlockTokens))*c.TokenBytes())
					if err = dev.CopyOut(buf, a); err == nil && [16]byte(buf) != marker(ids, pos) {
						err = fmt.Errorf("sequence %d token %d (hit %d): K/V not written for this prefix", seq, pos, hit)
					}
				}
				if err == nil {
					err = m.FreeSequence(seq)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	st := m.Stats()
	require.GreaterOrEqual(t, st.Prefix.HitTokens, uint64(workers*requests*12), "every request hit its system prompt")
	require.Zero(t, st.Warnings, "strict and well used")
	require.NoError(t, m.Verify())
}

// Strict mode refuses what is otherwise silent, and the warnings count it either way.
func TestStrictAndWarnings(t *testing.T) {
	dev := hostDevice(t, 4096)
	p := promptOf(13, 1)
	for _, strict := range []bool{false, true} {
		t.Run(fmt.Sprint("strict=", strict), func(t *testing.T) {
			cfg := tinyConfig()
			cfg.Strict = strict
			m := newManager(t, dev, cfg)
			_, err := m.AppendTokens(7, 3, nil)
			if strict {
				require.ErrorIs(t, err, kvcache.ErrUnknownSequence)
				_, err = m.Len(7)
				require.ErrorIs(t, err, kvcache.ErrUnknownSequence, "nothing was created")
				require.NoError(t, m.AddSequence(7))
				_, err = m.AppendTokens(7, 3, nil)
			}
			require.NoError(t, err)
			require.NoError(t, m.FreeSequence(7))
			_, err = m.AppendTokenIDs(7, p[:1], nil) // a late append after the free
			if strict {
				require.ErrorIs(t, err, kvcache.ErrUnknownSequence)
			} else {
				require.NoError(t, err)
				require.NoError(t, m.FreeSequence(7))
			}

			_, err = m.StartSequence(1, kvcache.Prompt{Tokens: p})
			require.NoError(t, err)
			_, err = m.AppendTokenIDs(1, p, nil)
			require.NoError(t, err)
			require.NoError(t, m.FreeSequence(1))
			hit, err := m.StartSequence(2, kvcache.Prompt{Tokens: p})
			require.NoError(t, err)
			require.Equal(t, 12, hit)
			_, err = m.AppendTokenIDs(2, p, nil) // the whole prompt again, not p[hit:]
			require.NoError(t, err)
			n, _ := m.Len(2)
			require.Equal(t, 12+13, n, "the prompt is doubled, as asked")
			_, err = m.AppendTokens(2, 1, nil) // a count-only append to a keyed sequence
			if strict {
				require.ErrorIs(t, err, kvcache.ErrNeedsTokenIDs)
				n2, _ := m.Len(2)
				require.Equal(t, n, n2, "nothing appended")
			} else {
				require.NoError(t, err)
			}
			want := kvcache.Warnings{ImplicitSequences: 2, UnkeyedAppends: 1, RepeatedPrompts: 1}
			if strict {
				want = kvcache.Warnings{RepeatedPrompts: 1}
			}
			require.Equal(t, want, m.Stats().Warnings)
			require.NoError(t, m.Verify())
		})
	}
}

// A sequence created empty (AddSequence, the way Strict asks for) whose tokens come with ids
// is cached like one AppendTokenIDs creates, in the zero namespace. One that took tokens
// without ids and was cut back to empty is keyed again from its own namespace, never from
// another: its K/V were computed for that namespace's adapter.
func TestAddedSequenceIsKeyed(t *testing.T) {
	dev := hostDevice(t, 4096)
	p := promptOf(13, 1) // 3 whole blocks of 4, and one token
	for _, strict := range []bool{false, true} {
		t.Run(fmt.Sprint("strict=", strict), func(t *testing.T) {
			cfg := tinyConfig()
			cfg.Strict = strict
			m := newManager(t, dev, cfg)
			require.NoError(t, m.AddSequence(1))
			_, err := m.AppendTokenIDs(1, p, nil)
			require.NoError(t, err)
			require.Equal(t, 3, m.Stats().Prefix.CachedBlocks, "the 3 full blocks are cached")
			hit, err := m.StartSequence(2, kvcache.Prompt{Tokens: p})
			require.NoError(t, err)
			require.Equal(t, 12, hit)
			require.NoError(t, m.Verify())
			if strict {
				return
			}
			ns := prefix.Namespace{Adapter: 7, Salt: "tenant"}
			q := promptOf(9, 2)
			_, err = m.StartSequence(3, kvcache.Prompt{Tokens: q, Namespace: ns})
			require.NoError(t, err)
			_, err = m.AppendTokens(3, 4, nil) // no ids: the sequence stops being cached
			require.NoError(t, err)
			require.NoError(t, m.Truncate(3, 4))
			_, err = m.AppendTokenIDs(3, q, nil)
			require.NoError(t, err)
			hit, err = m.StartSequence(4, kvcache.Prompt{Tokens: q})
			require.NoError(t, err)
			require.Zero(t, hit, "the adapter's blocks are no hit in the zero namespace")
			hit, err = m.StartSequence(5, kvcache.Prompt{Tokens: q, Namespace: ns})
			require.NoError(t, err)
			require.Equal(t, 8, hit, "they are in their own")
			require.NoError(t, m.Verify())
		})
	}
}
