// Package eventbench measures the KV-event publisher (package kvevents) for its benchmarks and
// the bench program: what a publisher attached to a manager costs the decode step, the block
// events per second it sends, and the latency from the append that caches a block to a
// subscriber's read of it.
package eventbench

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"slices"
	"sync/atomic"
	"time"

	"github.com/go-zeromq/zmq4"

	"github.com/pagedkv/pagedkv/internal/workload/kvbench"
	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/kvevents"
	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/vmm"
)

// Decoder runs kvbench.Decode's step on a manager of its own: AppendTokenIDs of one new id to
// each of 256 sequences in turn (a 0% hit rate: every block that fills is hashed, cached and,
// once the batch restarts, evicted), beside live idle sequences; every 1,024 tokens of each
// sequence the batch ends and starts again (untimed).
type Decoder struct {
	M     *kvcache.Manager
	dev   vmm.Device
	slots []int64
	id    []prefix.Token
	next  prefix.Token
	i     int
}

// NewDecoder returns a Decoder with live idle one-block sequences beside the batch; background
// runs the manager's reserve goroutine. Close it.
func NewDecoder(live int, background bool) (*Decoder, error) {
	dev, err := vmm.NewHostDevice(vmm.HostOptions{Granularity: 64 << 10, Capacity: 1 << 40})
	if err != nil {
		return nil, err
	}
	cfg := kvbench.Config()
	cfg.NoBackground = !background
	m, err := kvcache.New(dev, cfg)
	if err != nil {
		_ = dev.Close()
		return nil, err
	}
	d := &Decoder{M: m, dev: dev, slots: make([]int64, 0, 64), id: make([]prefix.Token, 1), next: 1}
	for i := range live {
		if _, err := m.AppendTokens(kvcache.SeqID(1<<32+i), cfg.BlockTokens, nil); err != nil {
			return nil, d.fail(err)
		}
	}
	for s := range kvbench.Batch {
		if err := d.append(s); err != nil {
			return nil, d.fail(err)
		}
	}
	return d, nil
}

func (d *Decoder) fail(err error) error {
	_ = d.Close()
	return err
}

// Poke returns a function that makes publisher p, attached to d's manager, send a batch: it
// caches a block in a sequence of its own, frees it and flushes.
func (d *Decoder) Poke(p *kvevents.Publisher) func() error {
	const seq = kvcache.SeqID(1 << 40)
	ids := make([]prefix.Token, d.M.Config().BlockTokens)
	return func() error {
		for i := range ids {
			ids[i] = d.next
			d.next++
		}
		if _, err := d.M.AppendTokenIDs(seq, ids, nil); err != nil {
			return err
		}
		if err := d.M.FreeSequence(seq); err != nil {
			return err
		}
		return p.Flush()
	}
}

// Close closes the manager and its device.
func (d *Decoder) Close() error {
	err := d.M.Close()
	if e := d.dev.Close(); err == nil {
		err = e
	}
	return err
}

func (d *Decoder) append(s int) error {
	d.id[0] = d.next
	d.next++
	var err error
	d.slots, err = d.M.AppendTokenIDs(kvcache.SeqID(s), d.id, d.slots[:0])
	return err
}

// Steps runs n decode steps and returns the time they took, the batch restarts excluded.
func (d *Decoder) Steps(n int) (time.Duration, error) {
	var took time.Duration
	t0 := time.Now()
	for range n {
		if err := d.append(d.i % kvbench.Batch); err != nil {
			return 0, err
		}
		d.i++
		if d.i == kvbench.Batch*1024 {
			took += time.Since(t0)
			for s := range kvbench.Batch {
				if err := d.M.FreeSequence(kvcache.SeqID(s)); err != nil {
					return 0, err
				}
				if err := d.append(s); err != nil {
					return 0, err
				}
			}
			d.i = 0
			t0 = time.Now()
		}
	}
	return took + time.Since(t0), nil
}

// Mallocs returns the heap objects allocated so far by the whole process (runtime/metrics, which
// does not stop the world as ReadMemStats does).
func Mallocs() uint64 {
	s := []metrics.Sample{{Name: "/gc/heap/allocs:objects"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

// Subscriber is what listens to the publisher during Overhead.
type Subscriber string

// The subscribers Overhead measures with.
const (
	// Absent: nobody is connected; the publisher encodes and drops its batches.
	Absent Subscriber = "absent"
	// Stalled: a subscriber connected that never reads.
	Stalled Subscriber = "stalled"
	// Deferred: nobody connected, and the publisher sends only between the timed chunks: what
	// the appending goroutine pays, without the publisher's own CPU time.
	Deferred Subscriber = "deferred"
	// Control: no publisher on either side, an A/A comparison: how far apart two measurements
	// of the same thing fall, the resolution of the method.
	Control Subscriber = "none (control)"
)

// The parts of the overhead: subscribers that do less than a publisher, each a step further
// from none, so that the differences of their ratios say what each part costs.
const (
	// Recorded: a subscription that the appending goroutine itself takes the events of, between
	// the timed chunks: what building and queueing the events costs, on one core.
	Recorded Subscriber = "recorded"
	// Ticking: Recorded, beside a goroutine that wakes every millisecond and does nothing
	// else: what a second goroutine's wake-ups cost, whatever it reads.
	Ticking Subscriber = "recorded, ticking"
	// Counting: a goroutine that, as a publisher batching every millisecond does, takes the
	// events (Subscription.Take) a millisecond after it is signalled, counts them and hands the
	// array back, touching none of them: what handing the events to another core costs.
	Counting Subscriber = "counting"
	// Touching: as Counting, and it reads every byte of the events' keys and token ids, as an
	// encoder would, allocating nothing: what reading the events on another core costs.
	Touching Subscriber = "touching"
	// AbsentNoGC: Absent with the collector off on both sides (GOGC=off): Absent less what the
	// collection of the publisher's garbage costs.
	AbsentNoGC Subscriber = "absent, GOGC=off"
	// Busy: no events at all, beside a goroutine that hashes 256 KiB of its own (SHA-256) for
	// BusyShare of every millisecond, sharing nothing with the manager: what another busy
	// core costs the appending one on this machine (its caches, memory and clock), whatever
	// the work. A control for the publisher's rows.
	Busy Subscriber = "busy core, no events"
)

// BusyShare is the part of every millisecond Busy's goroutine works.
const BusyShare = 0.3

// Overhead is the decode step with a publisher attached against the same step without.
type Overhead struct {
	NsNone, NsWith         float64 // ns per token, over all rounds
	Ratio, RatioMedian     float64 // with / without: over all rounds, and the median round's
	AllocsNone, AllocsWith float64 // objects the whole process allocated per token
	// CPURatio is the appending thread's own CPU time with / without, over all rounds, and
	// CPURatioMedian the median round's: what the steps cost the appender itself, less the
	// time it waited for a core (0 when the thread clock could not be read).
	CPURatio, CPURatioMedian float64
}

// Cycle is the decode steps between two restarts of the batch: 1,024 tokens of each sequence.
const Cycle = kvbench.Batch * 1024

// MeasureOverhead times the decode step (ids, 1,024 live sequences) on fresh managers, one
// without a publisher and one with, in turn (the order alternating) for rounds rounds: each
// manager runs a cycle untimed (after it, every block that fills evicts one) and then a timed
// cycle, the batch restart left out. Fresh managers each round spread what a manager's own
// memory layout does to its speed over both sides.
func MeasureOverhead(sub Subscriber, rounds int) (Overhead, error) {
	var o Overhead
	var t [2]time.Duration
	var allocs [2]uint64
	var cpu [2]time.Duration
	cpuOK := true
	ratios, cpuRatios := make([]float64, 0, rounds), make([]float64, 0, rounds)
	for r := range rounds {
		var d, c [2]time.Duration
		for k := range 2 {
			with := (r+k)%2 == 1
			took, a, tc, err := decodeCycle(sub, with)
			if err != nil {
				return o, err
			}
			i := b2i(with)
			d[i], c[i] = took, tc
			t[i] += took
			cpu[i] += tc
			allocs[i] += a
			cpuOK = cpuOK && tc > 0
		}
		ratios = append(ratios, float64(d[1])/float64(d[0]))
		cpuRatios = append(cpuRatios, float64(c[1])/float64(c[0]))
	}
	slices.Sort(ratios)
	slices.Sort(cpuRatios)
	if cpuOK {
		o.CPURatio, o.CPURatioMedian = float64(cpu[1])/float64(cpu[0]), cpuRatios[len(cpuRatios)/2]
	}
	tokens := float64(rounds * Cycle)
	o.NsNone, o.NsWith = float64(t[0].Nanoseconds())/tokens, float64(t[1].Nanoseconds())/tokens
	o.Ratio, o.RatioMedian = float64(t[1])/float64(t[0]), ratios[len(ratios)/2]
	o.AllocsNone, o.AllocsWith = float64(allocs[0])/tokens, float64(allocs[1])/tokens
	return o, nil
}

func b2i(v bool) int {
	if v {
		return 1
	}
	return 0
}

// decodeCycle runs a warm-up cycle and a timed one on a fresh manager, with a publisher (and
// sub's subscriber) attached when with is set, and returns the timed cycle's time, the objects
// the process allocated meanwhile and the appending thread's CPU time (-1 if unknown).
func decodeCycle(sub Subscriber, with bool) (_ time.Duration, _ uint64, _ time.Duration, err error) {
	if sub == Control {
		with = false
	}
	if sub == AbsentNoGC {
		runtime.GC()
		defer debug.SetGCPercent(debug.SetGCPercent(-1))
	}
	d, err := NewDecoder(1024, true)
	if err != nil {
		return 0, 0, 0, err
	}
	defer d.Close()
	var p *kvevents.Publisher
	take := func() {}
	if with && sub.part() {
		var done func() error
		if take, done, err = attachPart(d, sub); err != nil {
			return 0, 0, 0, err
		}
		defer func() {
			if e := done(); e != nil && err == nil {
				err = e
			}
		}()
	}
	if with && sub == Busy {
		stop := make(chan struct{})
		go busy(stop)
		defer close(stop)
	}
	if with && !sub.part() && sub != Busy {
		s, err := d.M.Subscribe(1 << 16)
		if err != nil {
			return 0, 0, 0, err
		}
		cfg := kvevents.Config{Endpoint: "tcp://127.0.0.1:*", ReplayEndpoint: "tcp://127.0.0.1:*", Pod: "bench", Model: "m"}
		if sub == Deferred {
			cfg.Batching = kvevents.EveryFlush
		}
		if p, err = kvevents.Start(s, cfg); err != nil {
			return 0, 0, 0, err
		}
		defer p.Close()
		if sub == Stalled {
			z, err := Connect(p, false, d.Poke(p))
			if err != nil {
				return 0, 0, 0, err
			}
			defer z.Close()
		}
	}
	// The warm-up cycle, then the timed one: under Deferred the publisher sends only between
	// chunks of 4,096 steps, untimed.
	var took, tc time.Duration
	var a uint64
	for cycle := range 2 {
		for done := 0; done < Cycle; done += 4096 {
			a0 := Mallocs()
			dt, dc, err := timedSteps(d, 4096)
			if err != nil {
				return 0, 0, 0, err
			}
			if cycle == 1 {
				took += dt
				if tc >= 0 && dc >= 0 {
					tc += dc
				} else {
					tc = -1
				}
				a += Mallocs() - a0
			}
			take()
			if p != nil && sub == Deferred {
				if err := p.Flush(); err != nil {
					return 0, 0, 0, err
				}
			}
		}
	}
	if p != nil {
		if st := p.Stats(); st.Blocks == 0 || st.Lost > 0 {
			return 0, 0, 0, fmt.Errorf("eventbench: the publisher sent %d blocks and lost %d events: not measuring what it says", st.Blocks, st.Lost)
		}
	}
	return took, a, tc, nil
}

// part reports whether sub is one of the parts, a reader without a publisher.
func (sub Subscriber) part() bool {
	return sub == Recorded || sub == Ticking || sub == Counting || sub == Touching
}

// attachPart subscribes part sub's reader to d's manager. It returns the function that the
// timed loop calls between chunks (Recorded takes the events there) and the one that detaches
// the reader, which fails if the reader lost events: then the row measured something else.
func attachPart(d *Decoder, sub Subscriber) (take func(), done func() error, err error) {
	s, err := d.M.Subscribe(1 << 16)
	if err != nil {
		return nil, nil, err
	}
	var lost uint64
	check := func() error {
		_ = s.Close()
		if lost > 0 {
			return fmt.Errorf("eventbench: the %s reader lost %d events: not measuring what it says", sub, lost)
		}
		return nil
	}
	if sub == Counting || sub == Touching {
		finished := make(chan uint64)
		go func() { finished <- read(s, sub == Touching) }()
		return func() {}, func() error {
			_ = s.Close()
			lost = <-finished
			return check()
		}, nil
	}
	stop := make(chan struct{})
	if sub == Ticking {
		go tick(stop)
	}
	var buf []prefix.Event
	return func() {
			buf = s.Take(buf)
			lost += countLost(buf)
		}, func() error {
			close(stop)
			return check()
		}, nil
}

// countLost returns the events that the EventsLost events among events report.
func countLost(events []prefix.Event) uint64 {
	var n uint64
	for i := range events {
		if events[i].Kind == prefix.EventsLost {
			n += events[i].Lost
		}
	}
	return n
}

// busy works (SHA-256 over a private 256 KiB buffer, in 4 KiB steps) for BusyShare of every
// millisecond, and sleeps the rest, until stop closes.
func busy(stop chan struct{}) {
	buf := make([]byte, 256<<10)
	for i := range buf {
		buf[i] = byte(i)
	}
	var sum [32]byte
	work := time.Duration(BusyShare * float64(time.Millisecond))
	for {
		start := time.Now()
		for off := 0; time.Since(start) < work; off = (off + 4096) % len(buf) {
			sum = sha256.Sum256(buf[off : off+4096])
			buf[off] ^= sum[0] // each pass hashes what the last one left
		}
		sink.Add(uint64(sum[0]))
		select {
		case <-stop:
			return
		case <-time.After(time.Millisecond - work):
		}
	}
}

// tick wakes every millisecond until stop closes.
func tick(stop chan struct{}) {
	for {
		select {
		case <-stop:
			return
		case <-time.After(kvevents.DefaultInterval):
		}
	}
}

// sink keeps what read sums, so that its reading is not optimised away.
var sink atomic.Uint64

// read takes s's batches until s closes, a millisecond after each signal as a publisher does,
// and hands each array back; with touch set it reads every byte of the events' keys and token
// ids. It returns the events lost.
func read(s *prefix.Subscription, touch bool) (lost uint64) {
	var buf []prefix.Event
	var sum uint64
	defer func() { sink.Add(sum) }()
	for range s.Ready() {
		time.Sleep(kvevents.DefaultInterval)
		buf = s.Take(buf)
		lost += countLost(buf)
		sum += uint64(len(buf))
		if !touch {
			continue
		}
		for i := range buf {
			for _, k := range buf[i].Keys {
				sum += binary.LittleEndian.Uint64(k[0:]) ^ binary.LittleEndian.Uint64(k[8:]) ^
					binary.LittleEndian.Uint64(k[16:]) ^ binary.LittleEndian.Uint64(k[24:])
			}
			for _, t := range buf[i].Tokens {
				sum += uint64(t)
			}
		}
	}
	return lost
}

// Sub is a ZMQ SUB socket connected to a publisher.
type Sub struct {
	s   zmq4.Socket
	got chan receipt
}

// receipt is a batch the subscriber received: its sequence number, and when.
type receipt struct {
	seq uint64
	at  time.Time
}

// next returns the next batch received, or an error after 20 s without one.
func (z *Sub) next() (receipt, error) {
	select {
	case r := <-z.got:
		return r, nil
	case <-time.After(20 * time.Second):
		return receipt{}, fmt.Errorf("eventbench: no batch within 20 s")
	}
}

// Connect connects a SUB socket to p's stream and returns once a batch has reached it (so that
// nothing sent afterwards is lost to ZMQ's slow joiner): until then it calls poke, which must
// make p send a batch. With read unset, nothing is read after that first batch.
func Connect(p *kvevents.Publisher, read bool, poke func() error) (*Sub, error) {
	z := &Sub{s: zmq4.NewSub(context.Background()), got: make(chan receipt, 1<<16)}
	if err := z.s.Dial(p.Addr()); err != nil {
		return nil, err
	}
	if err := z.s.SetOption(zmq4.OptionSubscribe, p.Topic()); err != nil {
		_ = z.s.Close()
		return nil, err
	}
	first := make(chan struct{})
	go func() {
		for i := 0; ; i++ {
			m, err := z.s.Recv()
			if err != nil {
				return
			}
			if i == 0 {
				close(first)
				if !read {
					return
				}
				continue
			}
			z.got <- receipt{seq: binary.BigEndian.Uint64(m.Frames[1]), at: time.Now()}
		}
	}()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if err := poke(); err != nil {
			_ = z.s.Close()
			return nil, err
		}
		select {
		case <-first:
			return z, nil
		case <-time.After(time.Millisecond):
		}
		if time.Now().After(deadline) {
			_ = z.s.Close()
			return nil, fmt.Errorf("eventbench: no batch reached the subscriber within 20 s")
		}
	}
}

// Close closes the socket.
func (z *Sub) Close() error { return z.s.Close() }

// Throughput sends batches of 1,024 one-block BlockStored events of 16 tokens (a decode step's)
// through a publisher to a subscriber in the same process, all on one core (GOMAXPROCS=1), and
// returns the block events the subscriber received per second.
func Throughput(batches int) (float64, error) {
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
	if err != nil {
		return 0, err
	}
	p, err := kvevents.Start(sub, kvevents.Config{Endpoint: "tcp://127.0.0.1:*", Pod: "bench", Model: "m", Batching: kvevents.EveryFlush})
	if err != nil {
		return 0, err
	}
	defer p.Close()
	z, err := Connect(p, true, func() error { f.Publish(events[0]); return p.Flush() })
	if err != nil {
		return 0, err
	}
	defer z.Close()
	received := 0
	t0 := time.Now()
	for sent := 1; sent <= batches; sent++ {
		f.Publish(events...)
		if err := p.Flush(); err != nil {
			return 0, err
		}
		for ; sent-received > 64 || (sent == batches && received < batches); received++ { // at most 64 batches in flight
			if _, err := z.next(); err != nil {
				return 0, err
			}
		}
	}
	return float64(batches*batch) / time.Since(t0).Seconds(), nil
}

// Latency times n blocks, one at a time, from the AppendTokenIDs call that caches the block to
// the subscriber's receipt of its batch, under batching, and returns the median and the 99th
// percentile.
func Latency(batching kvevents.Batching, n int) (p50, p99 time.Duration, err error) {
	d, err := NewDecoder(0, true)
	if err != nil {
		return 0, 0, err
	}
	defer d.Close()
	sub, err := d.M.Subscribe(1 << 16)
	if err != nil {
		return 0, 0, err
	}
	p, err := kvevents.Start(sub, kvevents.Config{Endpoint: "tcp://127.0.0.1:*", Pod: "bench", Model: "m", Batching: batching})
	if err != nil {
		return 0, 0, err
	}
	defer p.Close()
	z, err := Connect(p, true, d.Poke(p))
	if err != nil {
		return 0, 0, err
	}
	defer z.Close()
	ids := make([]prefix.Token, d.M.Config().BlockTokens)
	lat := make([]time.Duration, 0, n)
	seq := kvcache.SeqID(1 << 20)
	for range n {
		drain(z)
		for i := range ids {
			ids[i] = d.next
			d.next++
		}
		t0 := time.Now()
		if _, err := d.M.AppendTokenIDs(seq, ids, d.slots[:0]); err != nil {
			return 0, 0, err
		}
		if batching == kvevents.EveryFlush {
			if err := p.Flush(); err != nil {
				return 0, 0, err
			}
		}
		r, err := z.next()
		if err != nil {
			return 0, 0, err
		}
		lat = append(lat, r.at.Sub(t0))
		if err := d.M.FreeSequence(seq); err != nil { // its eviction goes out later, and is drained
			return 0, 0, err
		}
		seq++
	}
	slices.Sort(lat)
	return lat[len(lat)/2], lat[len(lat)*99/100], nil
}

// drain waits for the batches in flight (the previous block's eviction, if sent) and discards
// them, so that the next receipt is the next block's.
func drain(z *Sub) {
	for {
		select {
		case <-z.got:
		case <-time.After(2 * time.Millisecond):
			return
		}
	}
}
