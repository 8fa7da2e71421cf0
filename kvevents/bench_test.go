package kvevents_test

import (
	"math"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/workload/eventbench"
	"github.com/pagedkv/pagedkv/internal/workload/kvbench"
	"github.com/pagedkv/pagedkv/kvevents"
	"github.com/pagedkv/pagedkv/prefix"
)

// BenchmarkDecodeOverhead times kvbench.Decode's step with a publisher attached against the same
// step without, in the same run (eventbench.MeasureOverhead): ns/token of each, their ratio
// (goal: at most 1.05), the median round's ratio, the appending thread's own CPU time with /
// without, and the objects the whole process allocated per token of each, the publisher's
// goroutines included. One op is a round: a warm-up and a
// timed cycle of 262,144 steps on a fresh manager of each kind (run with -benchtime 7x).
func BenchmarkDecodeOverhead(b *testing.B) {
	for _, sub := range []eventbench.Subscriber{eventbench.Absent, eventbench.Stalled, eventbench.Deferred} {
		b.Run(string(sub), func(b *testing.B) {
			b.ReportAllocs()
			o, err := eventbench.MeasureOverhead(sub, b.N)
			require.NoError(b, err)
			b.ReportMetric(o.NsNone, "ns/token-none")
			b.ReportMetric(o.NsWith, "ns/token-publisher")
			b.ReportMetric(o.Ratio, "ratio")
			b.ReportMetric(o.RatioMedian, "ratio-median")
			b.ReportMetric(o.CPURatio, "cpu-ratio")
			b.ReportMetric(o.AllocsNone, "allocs/token-none")
			b.ReportMetric(o.AllocsWith, "allocs/token-publisher")
		})
	}
}

// BenchmarkDecodeParts takes the overhead of BenchmarkDecodeOverhead apart: the same
// measurement with readers that do a step more each (eventbench.Recorded, Ticking, Counting,
// Touching, AbsentNoGC, Absent), beside the A/A control and a busy core that shares nothing
// with the manager (eventbench.Busy, no events). The differences between their ratios are what
// recording, a second goroutine, handing the events to it, reading them there, collecting the
// publisher's garbage and encoding cost; Busy is what any second busy core costs on the
// machine. cpu-ratio is the appending thread's own CPU time with / without, which a busy
// machine disturbs less than the wall ratio. One op is a round (run with -benchtime 7x, several
// times in turn).
func BenchmarkDecodeParts(b *testing.B) {
	for _, sub := range []eventbench.Subscriber{eventbench.Control, eventbench.Busy, eventbench.Recorded, eventbench.Ticking, eventbench.Counting,
		eventbench.Touching, eventbench.AbsentNoGC, eventbench.Absent} {
		b.Run(string(sub), func(b *testing.B) {
			o, err := eventbench.MeasureOverhead(sub, b.N)
			require.NoError(b, err)
			b.ReportMetric(o.Ratio, "ratio")
			b.ReportMetric(o.RatioMedian, "ratio-median")
			b.ReportMetric(o.CPURatio, "cpu-ratio")
			b.ReportMetric(o.CPURatioMedian, "cpu-ratio-median")
		})
	}
}

// The decode step allocates nothing more with events subscribed than without: over 64k steps
// after a batch restart (4,096 blocks cached, as many evicted), the appending goroutine
// allocates only the event arrays beyond what a manager without subscribers does (one array
// per 1,024 keys, one per 1,024 blocks' token ids). The count is the process's, so nothing else
// may run meanwhile: the subscription is drained here, between the counts, as the publisher's
// goroutine would (Take) (a publisher's goroutines, and the ZMQ library's, allocate when the OS runs
// them: counting beside them failed one CI run in ten). The publisher has tests of its own.
func TestDecodeStepAllocs(t *testing.T) {
	none, err := eventbench.NewDecoder(0, false)
	require.NoError(t, err)
	defer none.Close()
	with, err := eventbench.NewDecoder(0, false)
	require.NoError(t, err)
	defer with.Close()
	sub, err := with.M.Subscribe(1 << 16)
	require.NoError(t, err)
	defer sub.Close()
	steps := func(d *eventbench.Decoder, n int) {
		_, err := d.Steps(n)
		require.NoError(t, err)
	}
	const n = 1 << 16
	warm := kvbench.Batch*1024 - kvbench.Batch + n // past a batch restart: evictions from now on
	steps(none, warm)
	steps(with, warm)
	var buf []prefix.Event
	buf = sub.Take(buf)
	// A cycle more, read as often: the arrays that writer and reader hand each other (Hand,
	// Take) have each grown to a round's events once.
	for range kvbench.Batch * 1024 / n {
		steps(none, n)
		steps(with, n)
		buf = sub.Take(buf)
	}
	// Three rounds, the least of each count: anything else that allocates meanwhile (the test
	// framework, goroutines of earlier tests winding down) only adds to a count.
	minNone, minWith, blocks := uint64(math.MaxUint64), uint64(math.MaxUint64), uint64(0)
	for range 3 {
		a0 := eventbench.Mallocs()
		steps(none, n)
		a1 := eventbench.Mallocs()
		steps(with, n)
		a2 := eventbench.Mallocs()
		buf = sub.Take(buf)
		blocks = 0
		for _, e := range buf {
			require.NotEqual(t, prefix.EventsLost, e.Kind, "the queue held every event")
			blocks += uint64(len(e.Keys))
		}
		require.Greater(t, blocks, uint64(n/16), "the steps cached and evicted blocks")
		minNone, minWith = min(minNone, a1-a0), min(minWith, a2-a1)
	}
	t.Logf("objects allocated over %d steps (least of 3): %d without a subscriber, %d with; %d blocks in events", n, minNone, minWith, blocks)
	require.LessOrEqual(t, minWith, minNone+2+blocks/512)
}

// BenchmarkEventsPerSecond reports the block events per second a publisher sends to a subscriber
// in the same process, all on one core (eventbench.Throughput; goal: 1 million). One op is a
// batch of 1,024.
func BenchmarkEventsPerSecond(b *testing.B) {
	rate, err := eventbench.Throughput(b.N)
	require.NoError(b, err)
	b.ReportMetric(rate, "blocks/s")
	b.ReportMetric(1e9/rate, "ns/block")
}

// BenchmarkLatency reports the median and 99th percentile from the AppendTokenIDs call that
// caches a block to the subscriber's receipt of its batch, per batching (eventbench.Latency).
func BenchmarkLatency(b *testing.B) {
	for _, batching := range []kvevents.Batching{kvevents.EveryCall, kvevents.EveryInterval} {
		b.Run(batching.String(), func(b *testing.B) {
			p50, p99, err := eventbench.Latency(batching, b.N)
			require.NoError(b, err)
			b.ReportMetric(float64(p50.Nanoseconds())/1e3, "p50-us")
			b.ReportMetric(float64(p99.Nanoseconds())/1e3, "p99-us")
		})
	}
}
