package redis

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier"
)

// EvictionQueue bounds the evictions a store queues for TakeEvictions: 56 bytes each, 3.5 MiB
// at most.
const EvictionQueue = 1 << 16

// The wait between two attempts to hear the server again, doubling from the first to the last.
const (
	firstRetry = 100 * time.Millisecond
	lastRetry  = 5 * time.Second
)

// evictions is a store's queue of the blocks removed without its caller (TakeEvictions), and
// the state of the subscription that hears the server remove them (Options.Evictions).
type evictions struct {
	stop chan struct{} // closed by Close
	done chan struct{} // closed when the watcher returns; nil without Options.Evictions

	// mu guards the following.
	mu        sync.Mutex
	reporting bool // TakeEvictions has been called
	queue     []tier.Eviction
	limit     int // EvictionQueue; smaller in tests
	lost      uint64
	ps        *goredis.PubSub // the watcher's subscription, which Close closes
	heard     error           // nil while the subscription hears the server, else why not
	confirms  uint64          // times the subscription was confirmed
	pong      string          // the payload of the last PONG the watcher read (a test's barrier)
	changed   chan struct{}   // closed, and replaced, when heard or pong changes
}

// errNotYet is Watching's answer before the subscription is confirmed.
var errNotYet = errors.New("not subscribed yet")

// startWatch prepares the store's eviction queue and, with Options.Evictions, starts the
// goroutine that hears the server.
func (s *Store) startWatch() {
	e := &s.ev
	e.stop, e.limit, e.changed = make(chan struct{}), EvictionQueue, make(chan struct{})
	e.heard = &OptionError{Field: "Evictions", Reason: "off: the store does not subscribe"}
	if !s.opt.Evictions {
		return
	}
	e.heard = &CallError{Op: "subscribe", Err: errNotYet}
	e.done = make(chan struct{})
	go s.watch()
}

// stopWatch ends the watcher, if any, and waits for it. Close calls it once.
func (s *Store) stopWatch() {
	e := &s.ev
	if e.stop == nil { // a Store not made by Open
		return
	}
	close(e.stop)
	e.mu.Lock()
	if e.ps != nil {
		_ = e.ps.Close() // ends the watcher's Receive
	}
	e.mu.Unlock()
	if e.done != nil {
		<-e.done
	}
}

// channels returns the keyspace-event channels of evicted and expired keys in the store's
// database.
func (s *Store) channels() []string {
	ep, _ := s.opt.endpoint() // Open has validated it
	db := strconv.Itoa(ep.db)
	return []string{"__keyevent@" + db + "__:evicted", "__keyevent@" + db + "__:expired"}
}

// watch reads the store's subscription until Close. Each time it is confirmed (the first time,
// and after each reconnection) the watcher makes sure the server sends the notifications, then
// reports every block of the store whose eviction or expiry it hears.
func (s *Store) watch() {
	e := &s.ev
	defer close(e.done)
	chans := s.channels()
	ps := s.client.Subscribe(context.Background(), chans...)
	e.mu.Lock()
	e.ps = ps
	e.mu.Unlock()
	if s.closed.Load() { // Close ran before e.ps was set: it did not close it
		_ = ps.Close()
		return
	}
	retry, confirmed := firstRetry, 0
	for {
		msg, err := ps.Receive(context.Background())
		if s.closed.Load() {
			return
		}
		if err != nil {
			confirmed = 0
			s.setHeard(s.fail("subscribe", 0, err))
			select {
			case <-e.stop:
				return
			case <-time.After(retry):
			}
			retry = min(2*retry, lastRetry)
			continue
		}
		switch m := msg.(type) {
		case *goredis.Subscription:
			if confirmed++; confirmed == len(chans) {
				retry = firstRetry
				s.hearing(s.configure())
			}
		case *goredis.Message:
			s.heardRemoved(m.Payload)
		case *goredis.Pong:
			e.mu.Lock()
			e.pong = m.Payload
			e.signalLocked()
			e.mu.Unlock()
		}
	}
}

// configure makes the server send the notifications of evicted and expired keys, adding the
// flags E, x and e to notify-keyspace-events where it lacks them. A refusal is counted and
// returned.
func (s *Store) configure() error {
	ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
	defer cancel()
	cur, err := s.client.ConfigGet(ctx, "notify-keyspace-events").Result()
	if err != nil {
		return s.fail("config", 0, err)
	}
	flags := cur["notify-keyspace-events"]
	add := ""
	for _, f := range "Exe" {
		if !strings.ContainsRune(flags, f) && (f == 'E' || !strings.ContainsRune(flags, 'A')) {
			add += string(f)
		}
	}
	if add == "" {
		return nil
	}
	if err := s.client.ConfigSet(ctx, "notify-keyspace-events", flags+add).Err(); err != nil {
		return s.fail("config", 0, err)
	}
	return nil
}

// hearing records a confirmed subscription: the server's notifications reach the store again.
// Blocks stored before may have been removed unheard meanwhile (before the first confirmation,
// or while the connection was down): that is reported as a loss. configErr is nil, or why the
// server may not send the notifications (CONFIG refused: the operator's configuration decides).
func (s *Store) hearing(configErr error) {
	e := &s.ev
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.reporting && s.puts.Load() > 0 {
		e.lost++
	}
	e.heard = configErr
	e.confirms++
	e.signalLocked()
}

// setHeard records why the store does not hear the server now.
func (s *Store) setHeard(err error) {
	e := &s.ev
	e.mu.Lock()
	e.heard = err
	e.signalLocked()
	e.mu.Unlock()
}

func (e *evictions) signalLocked() {
	close(e.changed)
	e.changed = make(chan struct{})
}

// heardRemoved queues the block a notification names, if it is one of the store's.
func (s *Store) heardRemoved(key string) {
	rest, ok := strings.CutPrefix(key, s.keyHead)
	// rest: <adapter, 16 hex>-<salt hash, 16 hex>:<key, 64 hex>
	if !ok || len(rest) != 16+1+16+1+64 || rest[16] != '-' || rest[33] != ':' {
		return
	}
	var adapter [8]byte
	var k prefix.Key
	if _, err := hex.Decode(adapter[:], []byte(rest[:16])); err != nil {
		return
	}
	if _, err := hex.Decode(k[:], []byte(rest[34:])); err != nil {
		return
	}
	s.report(tier.Eviction{NS: prefix.Namespace{Adapter: binary.BigEndian.Uint64(adapter[:])}, Key: k})
}

// report queues a block removed without the caller, once TakeEvictions has been called.
func (s *Store) report(ev tier.Eviction) {
	e := &s.ev
	e.mu.Lock()
	defer e.mu.Unlock()
	switch {
	case !e.reporting:
	case len(e.queue) < e.limit:
		e.queue = append(e.queue, ev)
	default:
		e.lost++
	}
}

// TakeEvictions moves the oldest blocks of the store that were removed without its caller into
// dst (see tier.EvictionReporter) and returns how many it moved, and how many it lost since the
// previous call. Reported are the blocks a Get deleted for failing their checks and, with
// Options.Evictions, those the server evicted or expired, from the first call on. A reported
// block's namespace holds its adapter but no salt: a key holds only the salt's hash. The
// store cannot tell a block stored again since, nor one another replica stored: it reports
// what it heard. Lost are the blocks past EvictionQueue, and one for each time the
// subscription was confirmed again after the store had stored blocks (they may have gone
// unheard meanwhile). It returns 0, 0 for a nil store.
func (s *Store) TakeEvictions(dst []tier.Eviction) (int, uint64) {
	if s == nil {
		return 0, 0
	}
	e := &s.ev
	e.mu.Lock()
	defer e.mu.Unlock()
	e.reporting = true
	n := copy(dst, e.queue)
	rest := copy(e.queue, e.queue[n:])
	clear(e.queue[rest:])
	e.queue = e.queue[:rest]
	lost := e.lost
	e.lost = 0
	return n, lost
}

// Watching reports whether the store hears the server's evictions and expiries
// (Options.Evictions): nil while its subscription is confirmed and the server was configured to
// send them, else why not: an *OptionError with Options.Evictions off, else a *CallError (not
// subscribed yet, the server down, CONFIG refused: then the store hears what the server's own
// configuration has it send).
func (s *Store) Watching() error {
	if s == nil {
		return fmt.Errorf("tier/redis: watching: %w: nil store", ErrInvalidArgument)
	}
	s.ev.mu.Lock()
	defer s.ev.mu.Unlock()
	if s.ev.heard != nil {
		return fmt.Errorf("tier/redis: watching: %w", s.ev.heard)
	}
	return nil
}

var _ tier.EvictionReporter = (*Store)(nil)
