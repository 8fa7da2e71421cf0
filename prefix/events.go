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
	// AllBlocksCleared: the whole cache on Medium (of Group, when HasGroup) was dropped.
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
	// three, BlockRemoved and AllBlocksCleared the group alone.
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
// that holds every batch so hands it to an empty queue at the pull (HandJournal), and no event
// is copied on its way to the reader.
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

// MaxQueue is the longest queue a subscription may have, in events.
const MaxQueue = 1 << 30

// Subscribe adds a subscription whose queue holds up to queue events, 1 to MaxQueue (a
// *CountError otherwise).
func (f *Feed) Subscribe(queue int) (*Subscription, error) {
	if f == nil {
		return nil, fmt.Errorf("prefix: subscribe: %w: nil feed", errdefs.ErrInvalidArgument)
	}
	if queue < 1 || queue > MaxQueue {
		return nil, fmt.Errorf("prefix: subscribe: %w", &errdefs.CountError{What: "queue length", N: queue, Min: 1, Max: MaxQueue})
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

// HandJournal queues the events of j, in order, on every subscription, as Publish does, and
// leaves j empty to fill next. A lone subscription whose queue is empty takes j's array whole
// and gives its own, emptied, in exchange, so that a writer that hands over each batch copies
// nothing. It never blocks on a reader.
func (f *Feed) HandJournal(j *Journal) {
	if f == nil || j == nil {
		if j != nil {
			j.Reset()
		}
		return
	}
	if subs := f.subs.Load(); subs != nil && j.Len() > 0 {
		if len(*subs) == 1 && (*subs)[0].swap(j) {
			return
		}
		for _, s := range *subs {
			s.pushJournal(j)
		}
	}
	j.Reset()
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
// The queue is a Journal: writers queue compact records (or a manager's whole journal,
// Feed.HandJournal), and a reader decodes them into Events after taking the queue whole, so
// that a reader never makes the append path wait and the append path builds no Event. A writer
// holds the subscription's lock only to queue its events and signal Ready; a reader only to
// take the queue and to give its emptied array back. Ready is signalled when the queue stops
// being empty, when events are queued after a Read's pull, or when a writer holds events back
// for the next Read (Feed.Hold): a reader that reads on every signal misses nothing. Ready is
// signalled under the lock, so that Close, which closes it, never races a signal.
type Subscription struct {
	f      *Feed
	mu     sync.Mutex // guards queue, spare, lost, closed
	queue  Journal
	spare  Journal // the queue a reader emptied, for the queue to be after the next read
	max    int
	lost   uint64
	ready  chan struct{}
	closed bool

	rmu sync.Mutex // serialises readers

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

// push queues events.
func (s *Subscription) push(events []Event) {
	s.queueUp(len(events), func(q *Journal) {
		for i := range events {
			q.Append(&events[i])
		}
	})
}

// pushJournal queues a copy of j's events.
func (s *Subscription) pushJournal(j *Journal) {
	s.queueUp(j.Len(), func(q *Journal) { q.appendJournal(j) })
}

// queueUp queues n events that add writes into the queue, or drops the queue and them when
// they would pass its bound. It signals Ready when the queue was empty, and when s was not
// marked unread: a reader's pull unmarks s and may queue behind events it has not taken yet,
// and Feed.Hold tells no marked subscription, so each marking must come with a signal.
func (s *Subscription) queueUp(n int, add func(q *Journal)) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	signal := s.queue.Len() == 0 && s.lost == 0
	if s.queue.Len()+n > s.max {
		s.lost += uint64(s.queue.Len() + n)
		s.queue.Reset()
		signal = true
	} else {
		add(&s.queue)
	}
	if !s.unread.Swap(true) {
		signal = true
	}
	if signal {
		s.signal()
	}
	s.mu.Unlock()
}

// swap queues j's events by taking its array, and leaves in j the queue's empty one in
// exchange. It does so only when the queue is empty and has an array of its own to give (a
// writer's next events then go in that array, and allocate nothing); otherwise it reports
// false and queues nothing.
func (s *Subscription) swap(j *Journal) bool {
	s.mu.Lock()
	if s.closed || s.queue.Len() > 0 || s.lost > 0 || cap(s.queue.b) == 0 || j.Len() > s.max {
		s.mu.Unlock()
		return false
	}
	spare := s.queue
	s.queue = *j
	s.queue.Seal()
	s.unread.Store(true)
	s.signal()
	s.mu.Unlock()
	spare.Reset()
	*j = spare
	return true
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
// closed when the subscription is. A nil Subscription, or one Subscribe did not make, returns a
// closed channel: it will never have events.
func (s *Subscription) Ready() <-chan struct{} {
	if s == nil || s.ready == nil { // a nil channel would block its reader forever
		return closedReady
	}
	return s.ready
}

// closedReady is the Ready of a Subscription that Subscribe did not make.
var closedReady = func() chan struct{} {
	c := make(chan struct{})
	close(c)
	return c
}()

// Read appends the waiting events to dst, oldest first (an EventsLost first if events were
// dropped), and returns it. Their keys and token ids are in arrays of their own. It never
// blocks.
func (s *Subscription) Read(dst []Event) []Event {
	if s == nil {
		return dst
	}
	return s.read(dst)
}

// Take returns the waiting events as Read does, in buf's array: the caller gives buf up, and
// gets it back, emptied and filled. A reader that hands back each batch it took once done with
// it allocates only the batch's keys and token ids. It never blocks.
func (s *Subscription) Take(buf []Event) []Event {
	if s == nil {
		return nil
	}
	clear(buf)
	return s.read(buf[:0])
}

// read takes the queue whole, lets the writers go on into the array the last read emptied,
// and decodes what it took into dst.
func (s *Subscription) read(dst []Event) []Event {
	s.pull()
	s.rmu.Lock()
	defer s.rmu.Unlock()
	s.mu.Lock()
	q, lost := s.queue, s.lost
	s.queue, s.lost = s.spare, 0
	s.spare = Journal{}
	s.mu.Unlock()
	if lost > 0 {
		dst = append(dst, Event{Kind: EventsLost, Lost: lost})
	}
	dst = q.appendTo(dst)
	q.Reset()
	s.mu.Lock()
	s.spare = q
	s.mu.Unlock()
	return dst
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
