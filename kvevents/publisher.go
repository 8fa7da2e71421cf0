package kvevents

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-zeromq/zmq4"

	"github.com/pagedkv/pagedkv/internal/errdefs"
	"github.com/pagedkv/pagedkv/prefix"
)

// Publisher sends the events of one subscription on a ZMQ PUB socket, and serves replay
// requests on a ROUTER socket when configured. It owns the subscription from Start on and
// closes it at Close. Safe for concurrent use.
type Publisher struct {
	cfg   Config
	topic []byte
	sub   *prefix.Subscription
	pub   zmq4.Socket
	rep   zmq4.Socket // nil without replay
	ring  ring
	addr  string
	raddr string

	flush   chan chan struct{}
	stop    chan struct{}
	runDone chan struct{}
	wg      sync.WaitGroup // the replay server and the dialer

	// The run goroutine owns the following.
	enc     encoder
	events  []prefix.Event
	scratch []byte
	seq     uint64

	mu     sync.Mutex // mu guards closed
	closed bool

	stats struct {
		batches, events, blocks, lost, replays, badRequests, errors atomic.Uint64
	}
}

// Stats are a publisher's figures since Start.
type Stats struct {
	Batches     uint64 // batches sent: the next batch's sequence number
	Events      uint64 // events sent
	Blocks      uint64 // block hashes sent, in BlockStored and BlockRemoved events
	Lost        uint64 // events the subscription dropped while the publisher was behind
	Replays     uint64 // replay requests answered
	BadRequests uint64 // malformed replay requests (not answered)
	Errors      uint64 // sends that failed
	Buffered    int    // batches replay holds
}

// quiet discards the log lines of the ZMQ sockets (a peer that fails the handshake, say): the
// publisher reports what matters through OnError and Stats.
var quiet = log.New(io.Discard, "", 0)

// Start binds (or connects) the sockets of cfg and starts sending the events of sub on a
// goroutine of its own. From then on the Publisher owns sub. An endpoint that cannot be bound
// is an *EndpointError now, not later; a connect endpoint is dialled in the background, again
// after every loss of the connection, as ZMQ does. On error nothing is left open and sub is
// the caller's again.
func Start(sub *prefix.Subscription, cfg Config) (*Publisher, error) {
	if sub == nil {
		return nil, fmt.Errorf("kvevents: start: %w: nil subscription", errdefs.ErrInvalidArgument)
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("kvevents: start: %w", err)
	}
	cfg = cfg.withDefaults()
	topic, _ := Topic(cfg.Pod, cfg.Model)
	p := &Publisher{
		cfg: cfg, topic: []byte(topic), sub: sub,
		flush: make(chan chan struct{}), stop: make(chan struct{}), runDone: make(chan struct{}),
		enc: encoder{maps: cfg.Encoding == Maps, raw: cfg.RawHashes, rank: cfg.DataParallelRank, names: cfg.LoRANames},
	}
	p.ring.max, p.ring.maxBytes = cfg.ReplayBuffer, cfg.ReplayBytes
	if err := p.open(); err != nil {
		p.closeSockets()
		return nil, fmt.Errorf("kvevents: start: %w", err)
	}
	go p.run()
	return p, nil
}

// open makes the sockets and binds them, starting the dialer of a connect endpoint and the
// replay server.
func (p *Publisher) open() error {
	ep, bind, _ := endpoint("Endpoint", p.cfg.Endpoint, p.cfg.DataParallelRank, false)
	opts := []zmq4.Option{zmq4.WithLogger(quiet)}
	if !bind { // go-zeromq redials a socket's endpoint after every lost connection: a dialler's only
		opts = append(opts, zmq4.WithDialerMaxRetries(-1), zmq4.WithDialerRetry(100*time.Millisecond),
			zmq4.WithAutomaticReconnect(true))
	}
	p.pub = zmq4.NewPub(context.Background(), opts...)
	if err := p.pub.SetOption(zmq4.OptionHWM, p.cfg.HWM); err != nil {
		return &ConfigError{Field: "HWM", Value: p.cfg.HWM, Reason: err.Error()}
	}
	registerGuard()
	if bind {
		if err := p.pub.Listen(guardedEndpoint(ep, zmq4.Pub)); err != nil {
			return &EndpointError{Endpoint: ep, Op: "bind", Err: err}
		}
		p.addr = boundAddr(ep, p.pub)
	} else {
		p.addr = ep
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			if err := p.pub.Dial(guardedEndpoint(ep, zmq4.Pub)); err != nil && !p.isClosed() {
				p.fail(&EndpointError{Endpoint: ep, Op: "connect", Err: err})
			}
		}()
	}
	if p.cfg.ReplayEndpoint == "" {
		return nil
	}
	rep, _, _ := endpoint("ReplayEndpoint", p.cfg.ReplayEndpoint, p.cfg.DataParallelRank, true)
	p.rep = zmq4.NewRouter(context.Background(), zmq4.WithLogger(quiet))
	if err := p.rep.Listen(guardedEndpoint(rep, zmq4.Router)); err != nil {
		return &EndpointError{Endpoint: rep, Op: "bind", Err: err}
	}
	p.raddr = boundAddr(rep, p.rep)
	p.wg.Add(1)
	go p.serveReplay()
	return nil
}

// boundAddr returns the address a socket listening on ep is reachable at: ep with the port
// the system picked for "*" or 0 and the loopback or wildcard host kept.
func boundAddr(ep string, s zmq4.Socket) string {
	if !strings.HasPrefix(ep, "tcp://") || s.Addr() == nil {
		return ep
	}
	return "tcp://" + s.Addr().String()
}

// closeSockets closes what open made and waits for its goroutines.
func (p *Publisher) closeSockets() {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	if p.pub != nil {
		_ = p.pub.Close()
	}
	if p.rep != nil {
		_ = p.rep.Close()
	}
	p.wg.Wait()
}

// made reports whether p came from Start.
func (p *Publisher) made() bool { return p != nil && p.stop != nil }

func (p *Publisher) isClosed() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.closed
}

// Addr returns the address subscribers reach the PUB socket at: the bound address with the
// port the system picked for tcp://host:*, or the endpoint connected to.
func (p *Publisher) Addr() string {
	if !p.made() {
		return ""
	}
	return p.addr
}

// ReplayAddr returns the address of the replay socket, like Addr, or "" without one.
func (p *Publisher) ReplayAddr() string {
	if !p.made() {
		return ""
	}
	return p.raddr
}

// Topic returns the topic every batch is sent under.
func (p *Publisher) Topic() string {
	if !p.made() {
		return ""
	}
	return string(p.topic)
}

// Stats returns the publisher's figures.
func (p *Publisher) Stats() Stats {
	if !p.made() {
		return Stats{}
	}
	s := &p.stats
	return Stats{
		Batches: s.batches.Load(), Events: s.events.Load(), Blocks: s.blocks.Load(), Lost: s.lost.Load(),
		Replays: s.replays.Load(), BadRequests: s.badRequests.Load(), Errors: s.errors.Load(), Buffered: p.ring.len(),
	}
}

// Flush sends the events waiting now as one batch (none when none wait) and returns once it is
// queued on the socket: under EveryFlush, a runtime calls it at the end of each step.
func (p *Publisher) Flush() error {
	if !p.made() {
		return fmt.Errorf("kvevents: flush: %w: publisher not started", errdefs.ErrInvalidArgument)
	}
	done := make(chan struct{})
	select {
	case p.flush <- done:
		<-done
		return nil
	case <-p.stop:
		return fmt.Errorf("kvevents: flush: %w", errdefs.ErrClosed)
	}
}

// Close sends the events still waiting, closes the sockets (batches the PUB socket still
// queues are dropped, as vLLM's publisher drops them) and the subscription, and waits for the
// publisher's goroutines. A second Close returns ErrClosed. One goroutine outlives it: the PUB
// socket's writer in go-zeromq (v0.17.0, the newest), whose Close never stops it. It holds a
// few kilobytes and no descriptor, once per Start.
func (p *Publisher) Close() error {
	if !p.made() {
		return fmt.Errorf("kvevents: close: %w: publisher not started", errdefs.ErrInvalidArgument)
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return fmt.Errorf("kvevents: close: %w", errdefs.ErrClosed)
	}
	p.closed = true
	p.mu.Unlock()
	close(p.stop)
	<-p.runDone
	p.closeSockets()
	_ = p.sub.Close() // ErrClosed when its manager closed it first
	return nil
}

// run sends batches as cfg.Batching says until Close.
func (p *Publisher) run() {
	defer close(p.runDone)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	armed := false // EveryInterval: a batch is gathering
	ready := p.sub.Ready()
	for {
		var tick <-chan time.Time
		if armed {
			tick = timer.C
		}
		var wake <-chan struct{}
		if !armed && p.cfg.Batching != EveryFlush {
			wake = ready
		}
		select {
		case <-p.stop:
			p.send()
			return
		case done := <-p.flush:
			p.send()
			close(done)
		case <-tick:
			armed = false
			p.send()
		case _, ok := <-wake:
			switch {
			case !ok: // the subscription is closed: send what it left
				ready = nil
				p.send()
			case p.cfg.Batching == EveryCall:
				p.send()
			default:
				timer.Reset(p.cfg.Interval)
				armed = true
			}
		}
	}
}

// send reads the events waiting and sends them as one batch.
func (p *Publisher) send() {
	p.events = p.sub.Take(p.events) // the last batch's array, emptied, takes the new one
	if len(p.events) == 0 {
		return
	}
	for i := range p.events {
		if p.events[i].Kind == prefix.EventsLost {
			p.stats.lost.Add(p.events[i].Lost)
		}
	}
	ts := float64(time.Now().UnixNano()) / 1e9
	var nEvents, nBlocks int
	p.scratch, nEvents, nBlocks = p.enc.appendBatch(p.scratch[:0], ts, p.events)
	if nEvents == 0 {
		return
	}
	// The socket queues the payload and replay keeps it: a buffer of its own, never written again.
	payload := append([]byte(nil), p.scratch...)
	seq := p.seq
	p.seq++
	frame := binary.BigEndian.AppendUint64(make([]byte, 0, 8), seq)
	p.ring.add(seq, payload)
	if err := p.pub.Send(zmq4.NewMsgFrom(p.topic, frame, payload)); err != nil {
		p.fail(fmt.Errorf("kvevents: send batch %d: %w", seq, err))
	}
	p.stats.batches.Add(1)
	p.stats.events.Add(uint64(nEvents))
	p.stats.blocks.Add(uint64(nBlocks))
}

// fail counts err as a failure and reports it.
func (p *Publisher) fail(err error) {
	p.stats.errors.Add(1)
	p.report(err)
}

// report hands err to OnError.
func (p *Publisher) report(err error) {
	if p.cfg.OnError != nil {
		p.cfg.OnError(err)
	}
}
