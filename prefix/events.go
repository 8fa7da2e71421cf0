package prefix

import (
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/pagedkv/pagedkv/internal/errdefs"
)

// EventKind says what an Event reports.
type EventKind uint8

// The events, after vLLM's KV events (vllm/distributed/kv_events.py), plus EventsLost.
const (
	// BlockStored: blocks became cached. Keys are in order, each the parent of the next; Parent is
	// the parent of Keys[0] (a namespace Root for a sequence's first block); Tokens holds
	// BlockSize tokens per key.
	BlockStored EventKind = iota + 1
	// BlockRemoved: blocks left the cache (evicted, or overwritten after a truncation).
	BlockRemoved
	// AllBlocksCleared: the whole cache was dropped.
	AllBlocksCleared
	// EventsLost: the subscriber fell behind by more than its queue, and Lost events were
	// dropped; it should rebuild its view from the manager's cached keys.
	EventsLost
)

// String names the kind as vLLM does.
func (k EventKind) String() string {
	switch k {
	case BlockStored:
		return "BlockStored"
	case BlockRemoved:
		return "BlockRemoved"
	case AllBlocksCleared:
		return "AllBlocksCleared"
	case EventsLost:
		return "EventsLost"
	}
	return fmt.Sprintf("EventKind(%d)", uint8(k))
}

// MediumGPU is the Medium of blocks in device memory, MediumCPU of blocks in the host tier's
// pinned memory (as vLLM's KV events name them).
const (
	MediumGPU = "GPU"
	MediumCPU = "CPU"
)

// Event is one KV event. Its slices belong to the reader once read.
type Event struct {
	Kind      EventKind
	Keys      []Key
	Parent    Key
	Tokens    []Token
	BlockSize int
	Adapter   uint64
	Medium    string
	Lost      uint64
	// ParentIsRoot reports, for BlockStored, that Parent is a namespace Root: Keys[0] is a
	// sequence's first block. vLLM sends no parent hash for such a block.
	ParentIsRoot bool
	// Group is the KV cache group of the blocks when HasGroup is set: models whose layers form
	// several groups (hybrid attention) keep one block table per group. GroupKind names the
	// group's attention ("full_attention", "sliding_window", as vLLM's kv_cache_spec_kind) and
	// SlidingWindow is its window in tokens; "" and 0 when unknown. BlockStored carries all
	// three, BlockRemoved the group alone.
	Group         int
	HasGroup      bool
	GroupKind     string
	SlidingWindow int
}

// Feed delivers events to its subscriptions. The zero Feed is ready to use. Safe for
// concurrent use.
//
// Publishing takes no lock of the feed's: the subscriptions are an immutable slice, replaced
// whole (under mu) when one is added or closed, so that the append path pays one lock, the
// subscription's, per call that has events.
type Feed struct {
	mu   sync.Mutex // serialises changes to subs
	subs atomic.Pointer[[]*Subscription]
	pull atomic.Pointer[func()]
}

// SetPull makes every Read of the feed's subscriptions first call pull, which delivers (by
// Publish) the events the writer holds back while every subscriber has some it has not read
// (Waiting): the writer then publishes in batches, and a reader still gets everything written
// before its Read. pull must not be called with a lock a writer holds while it publishes.
func (f *Feed) SetPull(pull func()) {
	if f != nil && pull != nil {
		f.pull.Store(&pull)
	}
}

// Waiting reports whether every subscription has events its reader has not read (or lost ones
// it has not been told of): its reader was signalled and will Read, so a writer with a pull
// function may hold back more events for that Read to pull.
func (f *Feed) Waiting() bool {
	if f == nil {
		return false
	}
	subs := f.subs.Load()
	if subs == nil || len(*subs) == 0 {
		return false
	}
	for _, s := range *subs {
		if !s.unread.Load() {
			return false
		}
	}
	return true
}

// Hold reports whether a writer may hold its events back for the next Read to pull: a pull
// function is set (SetPull) and someone subscribes. It makes sure every reader will Read: a
// subscription not marked as having unread events is marked, and its Ready signalled. A writer
// that holds every batch so hands it to an empty queue at the pull (Hand), and no event is
// copied on its way to the reader.
func (f *Feed) Hold() bool {
	if f == nil || f.pull.Load() == nil {
		return false
	}
	subs := f.subs.Load()
	if subs == nil || len(*subs) == 0 {
		return false
	}
	for _, s := range *subs {
		if !s.unread.Load() {
			s.tell()
		}
	}
	return true
}

// Active reports whether anyone subscribes, so that a writer builds events only then.
func (f *Feed) Active() bool {
	if f == nil {
		return false
	}
	subs := f.subs.Load()
	return subs != nil && len(*subs) > 0
}

// Subscribe adds a subscription whose queue holds up to queue events (at least 1).
func (f *Feed) Subscribe(queue int) (*Subscription, error) {
	if f == nil {
		return nil, fmt.Errorf("prefix: subscribe: %w: nil feed", errdefs.ErrInvalidArgument)
	}
	if queue < 1 {
		return nil, fmt.Errorf("prefix: subscribe: %w", &errdefs.CountError{What: "queue length", N: queue, Max: 1 << 30})
	}
	s := &Subscription{f: f, max: queue, ready: make(chan struct{}, 1)}
	f.mu.Lock()
	f.replace(func(subs []*Subscription) []*Subscription { return append(subs, s) })
	f.mu.Unlock()
	return s, nil
}

// replace sets the subscriptions to edit of a copy of them; f.mu is held.
func (f *Feed) replace(edit func([]*Subscription) []*Subscription) {
	var cur []*Subscription
	if p := f.subs.Load(); p != nil {
		cur = *p
	}
	next := edit(append([]*Subscription(nil), cur...))
	f.subs.Store(&next)
}

// Publish queues events, in order, on every subscription. It never blocks on a reader.
func (f *Feed) Publish(events ...Event) {
	if f == nil || len(events) == 0 {
		return
	}
	subs := f.subs.Load()
	if subs == nil {
		return
	}
	for _, s := range *subs {
		s.push(events)
	}
}

// Hand queues events, in order, on every subscription, as Publish does, and takes them: the
// caller gives events up and gets back an empty slice to fill next. A lone subscription whose
// queue is empty takes the events' array whole and gives its own back, so that a writer that
// hands over each batch copies no event. It never blocks on a reader.
func (f *Feed) Hand(events []Event) []Event {
	if f == nil {
		clear(events)
		return events[:0]
	}
	if subs := f.subs.Load(); subs != nil && len(events) > 0 {
		if len(*subs) == 1 {
			if spare, ok := (*subs)[0].swap(events); ok {
				return spare
			}
		}
		for _, s := range *subs {
			s.push(events)
		}
	}
	clear(events)
	return events[:0]
}

// Close closes every subscription.
func (f *Feed) Close() {
	if f == nil {
		return
	}
	f.mu.Lock()
	var subs []*Subscription
	if p := f.subs.Load(); p != nil {
		subs = *p
	}
	f.subs.Store(nil)
	f.mu.Unlock()
	for _, s := range subs {
		s.close()
	}
}

// Subscription is one reader's bounded queue of events. Policy: the writer never waits; when
// the queue would pass its bound, the queued events are dropped and counted, and the next Read
// returns an EventsLost event first. Safe for concurrent use.
//
// A writer holds the subscription's lock only to queue its events (or their array, Feed.Hand)
// and signal Ready; a reader holds it only to take the queue whole (Read copies the events out
// after letting go, Take copies nothing), so that a reader never makes the append path wait.
// Ready is signalled when the queue stops being empty, or when a writer holds events back for
// the next Read (Feed.Hold): a reader that reads on every signal misses nothing. Ready is
// signalled under the lock, so that Close, which closes it, never races a signal.
type Subscription struct {
	f      *Feed
	mu     sync.Mutex // guards queue, lost, closed
	queue  []Event
	max    int
	lost   uint64
	ready  chan struct{}
	closed bool

	rmu   sync.Mutex // serialises readers, which share spare
	spare []Event    // the queue a reader handed back, emptied, for the writers to fill next

	unread atomic.Bool // the reader was told of events or a loss it has not read (Feed.Waiting, Feed.Hold)
}

// tell marks s as having unread events and signals Ready, unless s is closed.
func (s *Subscription) tell() {
	s.mu.Lock()
	if !s.closed {
		s.unread.Store(true)
		s.signal()
	}
	s.mu.Unlock()
}

// push queues a copy of events.
func (s *Subscription) push(events []Event) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	signal := len(s.queue) == 0 && s.lost == 0
	if len(s.queue)+len(events) > s.max {
		s.lost += uint64(len(s.queue) + len(events))
		clear(s.queue)
		s.queue = s.queue[:0]
		signal = true
	} else {
		s.queue = append(s.queue, events...)
	}
	s.unread.Store(true)
	if signal {
		s.signal()
	}
	s.mu.Unlock()
}

// swap queues events by taking their array, and returns the queue's empty one in exchange. It
// does so only when the queue is empty and has an array of its own to give (a writer's next
// events then go in that array, and allocate nothing); otherwise it reports false and queues
// nothing.
func (s *Subscription) swap(events []Event) ([]Event, bool) {
	s.mu.Lock()
	if s.closed || len(s.queue) > 0 || s.lost > 0 || cap(s.queue) == 0 || len(events) > s.max {
		s.mu.Unlock()
		return nil, false
	}
	spare := s.queue
	s.queue = events
	s.unread.Store(true)
	s.signal()
	s.mu.Unlock()
	return spare, true
}

// signal makes Ready receive, unless a signal waits already. s.mu is held and s is open: Close
// closes the channel under s.mu.
func (s *Subscription) signal() {
	select {
	case s.ready <- struct{}{}:
	default:
	}
}

// Ready returns a channel that receives when events (or a loss) are waiting to be read. It is
// closed when the subscription is.
func (s *Subscription) Ready() <-chan struct{} {
	if s == nil {
		c := make(chan struct{})
		close(c)
		return c
	}
	return s.ready
}

// Read appends the waiting events to dst, oldest first (an EventsLost first if events were
// dropped), and returns it. It never blocks.
func (s *Subscription) Read(dst []Event) []Event {
	if s == nil {
		return dst
	}
	s.pull()
	s.rmu.Lock()
	defer s.rmu.Unlock()
	s.mu.Lock()
	q, lost := s.queue, s.lost
	s.queue, s.lost = s.spare[:0], 0
	s.spare = nil
	s.mu.Unlock()
	if lost > 0 {
		dst = append(dst, Event{Kind: EventsLost, Lost: lost})
	}
	dst = append(dst, q...)
	clear(q)
	s.spare = q[:0]
	return dst
}

// Take returns the waiting events as Read does, in a slice of their own that belongs to the
// caller, and takes buf: the caller gives buf up, and its array, emptied, is where writers
// queue next. A reader that hands back each batch it took once done with it copies no event,
// and neither do writers that hand theirs over (Feed.Hand). It never blocks.
func (s *Subscription) Take(buf []Event) []Event {
	if s == nil {
		return nil
	}
	s.pull()
	clear(buf)
	s.mu.Lock()
	q, lost := s.queue, s.lost
	s.queue, s.lost = buf[:0], 0
	s.mu.Unlock()
	if lost > 0 {
		q = append(append(make([]Event, 0, len(q)+1), Event{Kind: EventsLost, Lost: lost}), q...)
	}
	return q
}

// pull marks s read and then runs the feed's pull. In that order, a writer that holds events
// after the pull finds s unmarked and signals Ready (Feed.Hold): no event is left held with
// nobody told. A push between the pull and the reader's taking the queue leaves s marked with
// nothing unread, and Ready signalled, so a reader that reads on every signal still misses
// nothing.
func (s *Subscription) pull() {
	s.unread.Store(false)
	if s.f != nil {
		if pull := s.f.pull.Load(); pull != nil {
			(*pull)()
		}
	}
}

// Close ends the subscription: nothing more is queued, and Ready's channel is closed. A second
// Close returns ErrClosed.
func (s *Subscription) Close() error {
	if s == nil || s.f == nil {
		return fmt.Errorf("prefix: subscription: %w: nil subscription", errdefs.ErrInvalidArgument)
	}
	s.f.mu.Lock()
	s.f.replace(func(subs []*Subscription) []*Subscription {
		for i, o := range subs {
			if o == s {
				return append(subs[:i], subs[i+1:]...)
			}
		}
		return subs
	})
	s.f.mu.Unlock()
	if !s.close() {
		return fmt.Errorf("prefix: subscription: %w", errdefs.ErrClosed)
	}
	return nil
}

// close marks s closed and closes its channel; it reports false if s was closed already.
func (s *Subscription) close() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.closed = true
	close(s.ready)
	return true
}
