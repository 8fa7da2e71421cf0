package kvcache_test

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

// sharedTrace drives a SharedPool of three models through random operations (keyed appends,
// frees, forks, sleep and wake, compactions, reclaims, limit changes, unregistering and
// registering again) and checks after every step what the pool promises: the budget's used
// bytes are the models' mapped bytes, a step that maps more never passes the limit, a failed
// append changes nothing, an append refused for memory left no other model a free or cache-only
// page, Sleep and Reclaim give back exactly what they report, and every model verifies.
type sharedTrace struct {
	t      *testing.T
	sp     *kvcache.SharedPool
	cfg    kvcache.Config
	names  []string
	models []*kvcache.Manager // nil while unregistered
	lens   []map[kvcache.SeqID]int
	limit  uint64
	rng    *rand.Rand
	fault  *vmm.FaultDevice // with faults: a driver call of the next steps fails now and then
	armed  vmm.Op           // the operation whose call fails in this step ("" for none)
}

func newSharedTrace(t *testing.T, seed uint64, compact, faults bool) *sharedTrace {
	var dev vmm.Device = hostDevice(t, 32<<10)
	var fd *vmm.FaultDevice
	if faults {
		fd = vmm.InjectFaults(dev)
		dev = fd
	}
	cfg := tinyConfig()
	cfg.Capacity = 64 * cfg.PageSize
	cfg.PrefixCacheBytes = 4 * cfg.PageSize
	limit := 12 * cfg.PageSize
	sp, err := kvcache.NewShared(dev, kvcache.SharedConfig{Limit: limit, CompactOnPressure: compact})
	require.NoError(t, err)
	t.Cleanup(func() { _ = sp.Close() })
	x := &sharedTrace{t: t, sp: sp, cfg: cfg, names: []string{"a", "b", "c"}, limit: limit,
		rng: rand.New(rand.NewPCG(seed, 7)), fault: fd}
	for i := range x.names {
		x.models = append(x.models, nil)
		x.lens = append(x.lens, nil)
		x.register(i)
	}
	return x
}

func (x *sharedTrace) register(i int) {
	m, err := x.sp.Register(x.names[i], x.cfg)
	require.NoError(x.t, err)
	x.models[i], x.lens[i] = m, map[kvcache.SeqID]int{}
}

// ids returns n token ids of sequence seq from position from: sequences of one parity share
// their prompts, so that freed sequences leave cached blocks the next ones hit.
func (x *sharedTrace) tokenIDs(seq kvcache.SeqID, from, n int) []kvcache.TokenID {
	out := make([]kvcache.TokenID, n)
	for i := range out {
		out[i] = kvcache.TokenID(int(seq%2)*1000 + from + i)
	}
	return out
}

func (x *sharedTrace) used() uint64 { return x.sp.Stats().Used }

func (x *sharedTrace) sumMapped() uint64 {
	sum := uint64(0)
	for _, m := range x.models {
		if m != nil {
			sum += m.Stats().MappedBytes
		}
	}
	return sum
}

func (x *sharedTrace) check(step int, op string) {
	t := x.t
	require.Equal(t, x.sumMapped(), x.used(), "step %d %s: the budget's used bytes are the models' mapped bytes", step, op)
	for i, m := range x.models {
		if m == nil {
			continue
		}
		require.NoError(t, m.Verify(), "step %d %s: model %s", step, op, x.names[i])
		for s, n := range x.lens[i] {
			got, err := m.Len(s)
			require.NoError(t, err, "step %d %s: model %s sequence %d", step, op, x.names[i], s)
			require.Equal(t, n, got, "step %d %s: model %s sequence %d", step, op, x.names[i], s)
		}
	}
}

// unchanged returns what a failed append leaves as it was: all of shape's figures, but for the
// pages its rollback could not unmap (an unmap that fails leaves a mapped, free page).
func (x *sharedTrace) unchanged(s kvcache.Stats) kvcache.Stats {
	s = shape(s)
	if x.armed == vmm.OpUnmap {
		s.MappedPages, s.FreePages, s.MappedBytes, s.PageOverhead = 0, 0, 0, 0
	}
	return s
}

// step runs one random operation and returns its name.
func (x *sharedTrace) step() string {
	t, r := x.t, x.rng
	i := r.IntN(len(x.models))
	m := x.models[i]
	if m == nil {
		x.register(i)
		return "register " + x.names[i]
	}
	seq := kvcache.SeqID(r.IntN(8))
	if x.fault != nil {
		x.fault.Clear()
		x.armed = ""
		if r.IntN(4) == 0 {
			ops := []vmm.Op{vmm.OpMap, vmm.OpUnmap, vmm.OpCreate, vmm.OpRelease, vmm.OpCopy}
			x.armed = ops[r.IntN(len(ops))]
			require.NoError(t, x.fault.FailNth(x.armed, 1+r.IntN(3), nil))
		}
	}
	switch op := r.IntN(20); {
	case op < 8:
		n := 1 + r.IntN(24)
		before := x.unchanged(m.Stats())
		_, err := m.AppendTokenIDs(seq, x.tokenIDs(seq, x.lens[i][seq], n), nil)
		switch {
		case err == nil:
			x.lens[i][seq] += n
		case errorsIsAny(err, kvcache.ErrAsleep, vmm.ErrInjected):
			require.Equal(t, before, x.unchanged(m.Stats()), "a refused append changes nothing: %v", err)
		default:
			require.ErrorIs(t, err, kvcache.ErrOutOfMemory)
			require.Equal(t, before, x.unchanged(m.Stats()), "a refused append changes nothing")
			if m.Stats().MappedBytes+x.cfg.PageSize <= x.sp.Stats().Limit {
				for j, o := range x.models {
					if o != nil && j != i {
						st := o.Stats()
						require.Zero(t, st.FreePages+st.Prefix.CacheOnlyPages,
							"model %s refused for memory while %s keeps %d free and %d cache-only pages",
							x.names[i], x.names[j], st.FreePages, st.Prefix.CacheOnlyPages)
					}
				}
			}
		}
		return fmt.Sprintf("append %s %d %d", x.names[i], seq, n)
	case op < 11:
		err := m.FreeSequence(seq)
		if _, ok := x.lens[i][seq]; ok {
			require.NoError(t, err)
			delete(x.lens[i], seq)
		} else {
			require.ErrorIs(t, err, kvcache.ErrUnknownSequence)
		}
		return fmt.Sprintf("free %s %d", x.names[i], seq)
	case op < 12:
		dst := seq + 8
		if n, ok := x.lens[i][seq]; ok {
			if _, taken := x.lens[i][dst]; !taken {
				if err := m.Fork(seq, dst); err == nil {
					x.lens[i][dst] = n
				} else {
					require.ErrorIs(t, err, vmm.ErrInjected)
				}
			}
		}
		return fmt.Sprintf("fork %s %d", x.names[i], seq)
	case op < 13:
		before := m.Stats()
		res, err := m.Sleep()
		after := m.Stats()
		require.Equal(t, after.MappedPages, res.PagesMapped)
		require.Equal(t, before.MappedPages-after.MappedPages, res.PagesReleased, "sleep returns what it reports")
		if err != nil {
			require.ErrorIs(t, err, vmm.ErrInjected)
		} else {
			require.Zero(t, after.FreePages, "a sleeping model keeps no free page")
			require.Zero(t, after.Prefix.CachedBlocks, "nor any cache")
			require.Equal(t, (after.LiveBlocks+after.BlocksPerPage-1)/after.BlocksPerPage, after.MappedPages, "nor a page its live blocks do without")
		}
		return "sleep " + x.names[i]
	case op < 15:
		require.NoError(t, m.Wake())
		return "wake " + x.names[i]
	case op < 16:
		before := m.Stats().MappedBytes
		need := uint64(r.IntN(4)) * x.cfg.PageSize
		freed := m.Reclaim(need, r.IntN(2) == 0, true)
		require.Equal(t, before-m.Stats().MappedBytes, freed, "reclaim returns what it reports")
		return "reclaim " + x.names[i]
	case op < 17:
		pages := 1 + r.IntN(16)
		rep, err := x.sp.SetLimit(int64(pages) * int64(x.cfg.PageSize))
		require.NoError(t, err)
		require.Equal(t, x.used(), rep.Used)
		x.limit = rep.Limit
		if rep.Shortfall > 0 && x.armed == "" { // every model gave back all but its packed blocks
			for j, o := range x.models {
				if o == nil {
					continue
				}
				st := o.Stats()
				packed := (st.LiveBlocks + st.Prefix.IdleBlocks + st.BlocksPerPage - 1) / st.BlocksPerPage
				require.Equal(t, packed, st.MappedPages, "model %s keeps %d pages over a limit short by %d bytes: %+v", x.names[j], st.MappedPages, rep.Shortfall, st)
			}
		}
		return fmt.Sprintf("limit %d pages", pages)
	case op < 18:
		if _, err := m.Compact(kvcache.CompactOptions{}); err != nil {
			require.ErrorIs(t, err, vmm.ErrInjected)
		}
		return "compact " + x.names[i]
	case op < 19:
		if err := m.Settle(); err != nil {
			require.ErrorIs(t, err, vmm.ErrInjected)
		}
		return "settle " + x.names[i]
	default:
		if x.fault != nil {
			x.fault.Clear() // TestCloseUnmapFails fails Close's driver calls
		}
		require.NoError(t, x.sp.Unregister(x.names[i]))
		x.models[i] = nil
		return "unregister " + x.names[i]
	}
}

// TestSharedPoolRandomTrace runs sharedTrace over many seeds, with and without
// CompactOnPressure.
func TestSharedPoolRandomTrace(t *testing.T) {
	for _, faults := range []bool{false, true} {
		for _, compact := range []bool{false, true} {
			for seed := range uint64(8) {
				t.Run(fmt.Sprintf("faults=%v/compact=%v/seed=%d", faults, compact, seed), func(t *testing.T) {
					x := newSharedTrace(t, seed, compact, faults)
					for step := range 400 {
						usedBefore := x.used()
						op := x.step()
						if u := x.used(); u > usedBefore {
							require.LessOrEqual(t, u, x.limit, "step %d %s: a step that maps more stays under the limit", step, op)
						}
						x.check(step, op)
					}
					if x.fault != nil {
						x.fault.Clear()
					}
					require.NoError(t, x.sp.Close())
					require.Zero(t, x.used())
				})
			}
		}
	}
}

// Goroutines on three models of one pool, with their reserve goroutines on, append, free, sleep,
// wake, compact, settle and reclaim while others change the limit and close and register models
// again: no deadlock, no race (run with -race), and afterwards the budget holds exactly the
// models' mapped pages and every model verifies.
func TestSharedPoolConcurrentLifecycle(t *testing.T) {
	dev := hostDevice(t, 32<<10)
	cfg := tinyConfig()
	cfg.NoBackground = false
	cfg.ReservePages = 2
	cfg.Capacity = 128 * cfg.PageSize
	cfg.PrefixCacheBytes = 4 * cfg.PageSize
	sp, err := kvcache.NewShared(dev, kvcache.SharedConfig{Limit: 24 * cfg.PageSize, CompactOnPressure: true})
	require.NoError(t, err)
	defer func() { require.NoError(t, sp.Close()) }()
	names := []string{"a", "b", "c"}
	for _, n := range names {
		_, err := sp.Register(n, cfg)
		require.NoError(t, err)
	}
	// Whatever a model does while another goroutine closes or sleeps it, these are its answers.
	allowed := []error{kvcache.ErrUnknownSequence, kvcache.ErrOutOfMemory, kvcache.ErrAsleep, kvcache.ErrClosed,
		kvcache.ErrNotFound, kvcache.ErrExists, kvcache.ErrSequenceExists}
	done := make(chan error, 10)
	for w := range 10 {
		go func() {
			r := rand.New(rand.NewPCG(uint64(w), 1))
			for i := range 300 {
				name := names[r.IntN(len(names))]
				m, err := sp.Model(name)
				if err != nil {
					if !errorsIsAny(err, allowed...) {
						done <- err
						return
					}
					continue
				}
				seq := kvcache.SeqID(w*16 + r.IntN(16))
				switch op := r.IntN(40); {
				case op < 20:
					ids := make([]kvcache.TokenID, 1+r.IntN(12))
					for j := range ids {
						ids[j] = kvcache.TokenID(int(seq%3)*100 + j)
					}
					_, err = m.AppendTokenIDs(seq, ids, nil)
				case op < 28:
					err = m.FreeSequence(seq)
				case op < 30:
					_, err = m.Sleep()
				case op < 32:
					err = m.Wake()
				case op < 33:
					_, err = m.Compact(kvcache.CompactOptions{})
				case op < 34:
					err = m.Settle()
				case op < 35:
					m.Reclaim(uint64(r.IntN(3))*cfg.PageSize, true, r.IntN(2) == 0)
				case op < 37:
					_, err = sp.SetLimit(int64(8+r.IntN(24)) * int64(cfg.PageSize))
				case op < 38:
					_, err = m.DropCache()
				case op < 39:
					err = sp.Unregister(name)
				default:
					_, err = sp.Register(name, cfg)
				}
				if err != nil && !errorsIsAny(err, allowed...) {
					done <- fmt.Errorf("worker %d step %d: %w", w, i, err)
					return
				}
			}
			done <- nil
		}()
	}
	for range 10 {
		require.NoError(t, <-done)
	}
	// Asleep, the reserve goroutines map nothing more: the sum holds still to be compared.
	var live []*kvcache.Manager
	for _, n := range names {
		if m, err := sp.Model(n); err == nil {
			_, err := m.Sleep()
			require.NoError(t, err)
			live = append(live, m)
		}
	}
	sum := uint64(0)
	for _, m := range live {
		require.NoError(t, m.Verify())
		sum += m.Stats().MappedBytes
	}
	require.Equal(t, sum, sp.Stats().Used)
}
