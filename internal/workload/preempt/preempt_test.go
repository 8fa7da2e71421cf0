package preempt

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/leakcheck"
	"github.com/pagedkv/pagedkv/internal/workload/chattrace"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

func TestMain(m *testing.M) { leakcheck.Main(m) }

// With the device holding half the working set: swapping recomputes nothing of a preempted
// request (preemption by freeing recomputes it), and the host prefix cache recomputes fewer
// prompt tokens than either in all, since it also keeps the context between a conversation's
// turns, which the device's cache loses.
func TestHalfTheWorkingSet(t *testing.T) {
	leakcheck.Check(t)
	o := chattrace.Issue()
	o.Conversations, o.Concurrent, o.Seed = 120, 24, 3
	results := map[Policy]Result{}
	for _, p := range []Policy{Recompute, Swap, HostCache} {
		dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 64 << 10, Capacity: 1 << 40})
		require.NoError(t, err)
		cfg, ws := Config(o, p)
		m, err := kvcache.New(dev, cfg)
		require.NoError(t, err)
		r, err := Run(m, p, o)
		require.NoError(t, err, "%v", p)
		require.NoError(t, m.Verify())
		st := m.Stats()
		assert.Zero(t, st.Sequences, "every request ended")
		assert.Zero(t, st.Prefix.HostFailures)
		t.Logf("%v: working set %d blocks; %d requests, %d preemptions (%d swaps); %d prompt tokens computed, %d of them again "+
			"(%d after a preemption, %d at a new turn); %.1f MiB over PCIe", p, ws, r.Requests, r.Preemptions, r.Swaps, r.PrefillTokens,
			r.RecomputedTokens, r.RecomputedPreempted, r.RecomputedTurns, float64(r.HostBytes)/(1<<20))
		results[p] = r
		require.NoError(t, m.Close())
		require.NoError(t, dev.Close())
	}
	base := results[Recompute]
	require.Positive(t, base.Preemptions, "half the working set must preempt")
	require.Positive(t, base.RecomputedPreempted)
	sw := results[Swap]
	require.Positive(t, sw.Swaps)
	assert.Equal(t, sw.Preemptions, sw.Swaps, "the host tier holds every preempted request")
	assert.Zero(t, sw.RecomputedPreempted, "a swapped request comes back whole")
	assert.Less(t, results[HostCache].RecomputedTokens, min(base.RecomputedTokens, sw.RecomputedTokens))
}
