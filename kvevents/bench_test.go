package kvevents

import (
	"encoding/binary"
	"math"
	"runtime"
	"runtime/metrics"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/workload/kvbench"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/vmm"
)

// decoder runs kvbench.Decode's step on a manager of its own: AppendTokenIDs of one new id to
// each of 256 sequences in turn (a 0% hit rate: every block that fills is hashed, cached and,
// once the batch restarts, evicted), beside live idle sequences; every 1,024 tokens of each
// sequence the batch ends and starts again (untimed by the caller).
type decoder struct {
	m     *kvcache.Manager
	slots []int64
	id    []prefix.Token
	next  prefix.Token
	i     int
}

func newDecoder(tb testing.TB, live int, background bool) *decoder {
	tb.Helper()
	dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 64 << 10, Capacity: 1 << 40})
	require.NoError(tb, err)
	tb.Cleanup(func() { require.NoError(tb, dev.Close()) })
	cfg := kvbench.Config()
	cfg.NoBackground = !background
	m, err := kvcache.New(dev, cfg)
	require.NoError(tb, err)
	tb.Cleanup(func() { require.NoError(tb, m.Close()) })
	bt := m.Config().BlockTokens
	for i := range live {
		_, err := m.AppendTokens(kvcache.SeqID(1<<32+i), bt, nil)
		require.NoError(tb, err)
	}
	d := &decoder{m: m, slots: make([]int64, 0, 64), id: make([]prefix.Token, 1), next: 1}
	for s := range kvbench.Batch {
		d.append(tb, s)
	}
	return d
}

func (d *decoder) append(tb testing.TB, s int) {
	d.id[0] = d.next
	d.next++
	var err error
	if d.slots, err = d.m.AppendTokenIDs(kvcache.SeqID(s), d.id, d.slots[:0]); err != nil {
		tb.Fatal(err)
	}
}

// steps runs n decode steps and returns the time they took, the batch restarts excluded.
func (d *decoder) steps(tb testing.TB, n int) time.Duration {
	var took time.Duration
	t0 := time.Now()
	for range n {
		d.append(tb, d.i%kvbench.Batch)
		d.i++
		if d.i == kvbench.Batch*1024 {
			took += time.Since(t0)
			for s := range kvbench.Batch {
				require.NoError(tb, d.m.FreeSequence(kvcache.SeqID(s)))
				d.append(tb, s)
			}
			d.i = 0
			t0 = time.Now()
		}
	}
	return took + time.Since(t0)
}

// mallocs returns the heap objects allocated so far by the whole process (runtime/metrics, which
// does not stop the world as ReadMemStats does).
func mallocs() uint64 {
	s := []metrics.Sample{{Name: "/gc/heap/allocs:objects"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

// BenchmarkDecodeOverhead times kvbench.Decode's step (ids, 1,024 live sequences) on two
// managers in the same run, one with a publisher attached and one without, in alternating
// chunks of 256 steps so that both see the same machine. It reports ns/token of each, their
// ratio (goal: at most 1.05), the median of the ratios of the chunk pairs (which bursts of
// other work on the machine move less), and the objects the whole process allocated per token
// of each, the publisher's goroutines included. The subscriber is absent (nobody connected),
// stalled (connected, never reading), or absent with the publisher sending between the timed
// chunks (deferred: what the appending goroutine pays, without the publisher's own CPU time).
func BenchmarkDecodeOverhead(b *testing.B) {
	for _, mode := range []string{"absent", "stalled", "deferred"} {
		b.Run(mode, func(b *testing.B) { decodeOverhead(b, mode) })
	}
}

func decodeOverhead(b *testing.B, mode string) {
	deferred := mode == "deferred"
	none, with := newDecoder(b, 1024, true), newDecoder(b, 1024, true)
	sub, err := with.m.Subscribe(1 << 16)
	require.NoError(b, err)
	cfg := Config{Endpoint: "tcp://127.0.0.1:*", ReplayEndpoint: "tcp://127.0.0.1:*", Pod: "bench", Model: "m"}
	if deferred {
		cfg.Batching = EveryFlush
	}
	p, err := Start(sub, cfg)
	require.NoError(b, err)
	b.Cleanup(func() { _ = p.Close() })
	if mode == "stalled" {
		subscribe(b, p, "kv@") // and never read
	}
	const chunk = 256
	var tNone, tWith time.Duration
	var aNone, aWith uint64
	var ratios []float64
	for b.Loop() {
		// Each pair of chunks in turn order, so that neither always follows the other.
		var dNone, dWith time.Duration
		for k := range 2 {
			if (len(ratios)+k)%2 == 0 {
				a0 := mallocs()
				dNone = none.steps(b, chunk)
				aNone += mallocs() - a0
			} else {
				a0 := mallocs()
				dWith = with.steps(b, chunk)
				aWith += mallocs() - a0
			}
		}
		tNone, tWith = tNone+dNone, tWith+dWith
		ratios = append(ratios, float64(dWith)/float64(dNone))
		if deferred {
			b.StopTimer()
			require.NoError(b, p.Flush())
			b.StartTimer()
		}
	}
	slices.Sort(ratios)
	tokens := float64(b.N * chunk)
	b.ReportMetric(float64(tNone.Nanoseconds())/tokens, "ns/token-none")
	b.ReportMetric(float64(tWith.Nanoseconds())/tokens, "ns/token-publisher")
	b.ReportMetric(float64(tWith)/float64(tNone), "ratio")
	b.ReportMetric(ratios[len(ratios)/2], "ratio-median")
	b.ReportMetric(float64(aNone)/tokens, "allocs/token-none")
	b.ReportMetric(float64(aWith)/tokens, "allocs/token-publisher")
	if st := p.Stats(); st.Blocks == 0 || st.Lost > 0 {
		b.Fatalf("the publisher sent %d blocks and lost %d events: the benchmark is not measuring what it says", st.Blocks, st.Lost)
	}
}

// The decode step allocates nothing more with events subscribed than without: over 64k steps
// after a batch restart (4,096 blocks cached, as many evicted), the appending goroutine
// allocates only the event arrays beyond what a manager without subscribers does (one array
// per 1,024 keys, one per 1,024 blocks' token ids). The count is the process's, so nothing else
// may run meanwhile: the subscription is drained here, between the counts, as the publisher's
// goroutine would (a publisher's goroutines, and the ZMQ library's, allocate when the OS runs
// them: counting beside them failed one CI run in ten). The publisher has tests of its own.
func TestDecodeStepAllocs(t *testing.T) {
	none, with := newDecoder(t, 0, false), newDecoder(t, 0, false)
	sub, err := with.m.Subscribe(1 << 16)
	require.NoError(t, err)
	defer sub.Close()
	const steps = 1 << 16
	warm := kvbench.Batch*1024 - kvbench.Batch + steps // past a batch restart: evictions from now on
	none.steps(t, warm)
	with.steps(t, warm)
	var buf []prefix.Event
	buf = sub.Read(buf[:0])
	// Three rounds, the least of each count: anything else that allocates meanwhile (the test
	// framework, goroutines of earlier tests winding down) only adds to a count.
	minNone, minWith, blocks := uint64(math.MaxUint64), uint64(math.MaxUint64), uint64(0)
	for range 3 {
		a0 := mallocs()
		none.steps(t, steps)
		a1 := mallocs()
		with.steps(t, steps)
		a2 := mallocs()
		buf = sub.Read(buf[:0])
		blocks = 0
		for _, e := range buf {
			require.NotEqual(t, prefix.EventsLost, e.Kind, "the queue held every event")
			blocks += uint64(len(e.Keys))
		}
		require.Greater(t, blocks, uint64(steps/16), "the steps cached and evicted blocks")
		minNone, minWith = min(minNone, a1-a0), min(minWith, a2-a1)
	}
	t.Logf("objects allocated over %d steps (least of 3): %d without a subscriber, %d with; %d blocks in events", steps, minNone, minWith, blocks)
	require.LessOrEqual(t, minWith, minNone+2+blocks/512)
}

// BenchmarkEventsPerSecond sends one-block BlockStored events of 16 tokens (a decode step's)
// through a publisher to a subscriber in the same process, all on one core (GOMAXPROCS=1), in
// batches of 1,024, and reports the block events the subscriber received per second (goal: 1
// million).
func BenchmarkEventsPerSecond(b *testing.B) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	const batch = 1024
	events := make([]prefix.Event, batch)
	tokens := make([]prefix.Token, 16*batch)
	for i := range tokens {
		tokens[i] = prefix.Token(i * 7919 % 151000)
	}
	keys := prefix.Keys(nil, prefix.Namespace{}, 16, tokens)
	root := prefix.Root(prefix.Namespace{}, 16)
	for i := range events {
		events[i] = prefix.Event{Kind: prefix.BlockStored, Keys: keys[i : i+1], Parent: root, Tokens: tokens[16*i : 16*i+16],
			BlockSize: 16, Medium: prefix.MediumGPU}
		if i > 0 {
			events[i].Parent = keys[i-1]
		}
	}
	var f prefix.Feed
	sub, err := f.Subscribe(1 << 20)
	require.NoError(b, err)
	p, err := Start(sub, Config{Endpoint: "tcp://127.0.0.1:*", Pod: "bench", Model: "m", Batching: EveryFlush})
	require.NoError(b, err)
	defer p.Close()
	s := subscribe(b, p, "kv@")
	got := make(chan uint64, 1<<16)
	go func() {
		for {
			m, err := s.s.Recv()
			if err != nil {
				return
			}
			got <- binary.BigEndian.Uint64(m.Frames[1])
		}
	}()
	next := p.Stats().Batches
	t0 := time.Now()
	sent := 0
	for b.Loop() {
		f.Publish(events...)
		require.NoError(b, p.Flush())
		sent++
		for len(got) > 0 || sent-int(next) > 64 { // keep at most 64 batches in flight
			require.Equal(b, next, <-got)
			next++
		}
	}
	for int(next) < sent {
		require.Equal(b, next, <-got)
		next++
	}
	took := time.Since(t0)
	b.ReportMetric(float64(sent*batch)/took.Seconds(), "blocks/s")
	b.ReportMetric(float64(took.Nanoseconds())/float64(sent*batch), "ns/block")
}

// BenchmarkLatency times a block from the AppendTokenIDs call that caches it to the
// subscriber's read of its batch, one block at a time, and reports the median and the 99th
// percentile, per batching.
func BenchmarkLatency(b *testing.B) {
	for _, batching := range []Batching{EveryCall, EveryInterval} {
		b.Run(batching.String(), func(b *testing.B) {
			d := newDecoder(b, 0, true)
			sub, err := d.m.Subscribe(1 << 16)
			require.NoError(b, err)
			p, err := Start(sub, Config{Endpoint: "tcp://127.0.0.1:*", Pod: "bench", Model: "m", Batching: batching})
			require.NoError(b, err)
			defer p.Close()
			s := subscribe(b, p, "kv@")
			got := make(chan time.Time, 16)
			go func() {
				for {
					if _, err := s.s.Recv(); err != nil {
						return
					}
					got <- time.Now()
				}
			}()
			bt := d.m.Config().BlockTokens
			ids := make([]prefix.Token, bt)
			var lat []time.Duration
			seq := kvcache.SeqID(1 << 20)
			for b.Loop() {
				for i := range ids {
					ids[i] = d.next
					d.next++
				}
				t0 := time.Now()
				if _, err := d.m.AppendTokenIDs(seq, ids, d.slots[:0]); err != nil {
					b.Fatal(err)
				}
				lat = append(lat, (<-got).Sub(t0))
				b.StopTimer()
				require.NoError(b, d.m.FreeSequence(seq)) // its eviction goes out later, unread
				seq++
				b.StartTimer()
			}
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds())/1e3, "p50-us")
			b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds())/1e3, "p99-us")
		})
	}
}
