package ledger

import (
	"cmp"
	"errors"
	"fmt"
	"math"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pagedkv/pagedkv/internal/checked"
	"github.com/pagedkv/pagedkv/internal/errdefs"
	"github.com/pagedkv/pagedkv/internal/names"
	"github.com/pagedkv/pagedkv/vmm"
)

// Holder is what a member gives the ledger: a manager, usually (kvcache does this for every
// model of a SharedPool that has a Ledger). Its methods are called from the member's responder
// goroutine when another process asks, and must be safe for concurrent use.
type Holder interface {
	// Reclaim gives back up to need bytes, as vmm.Reclaimer describes; compact is false unless
	// the member joined with AllowCompact. A holder that is also a vmm.TryReclaimer is asked
	// again only when it was busy.
	vmm.Reclaimer
	// DropCache empties the holder's prefix cache (pagedkvctl drop-cache).
	DropCache()
	// Usage reports what the holder does with its memory, for pagedkvctl list and top.
	Usage() Usage
}

// Usage is what a member last published about itself.
type Usage struct {
	Sequences   int
	LiveBlocks  int
	MappedPages int
	// QueryTokens and HitTokens are the prefix cache's counters: HitTokens/QueryTokens is the
	// hit rate.
	QueryTokens, HitTokens uint64
	CachedBlocks           int
	// PageOverhead is mapped pages over the pages the live (and idle cached) blocks need.
	PageOverhead float64
	Updated      time.Time // when the member published it
}

// HitRate is HitTokens/QueryTokens (0 before any query).
func (u Usage) HitRate() float64 {
	if u.QueryTokens == 0 {
		return 0
	}
	return float64(u.HitTokens) / float64(u.QueryTokens)
}

// usage words in a slot, from sUsage on.
const (
	uSequences = iota
	uLiveBlocks
	uMappedPages
	uQueryTokens
	uHitTokens
	uCachedBlocks
	uOverhead // float64 bits
	uUpdated  // unix nanoseconds
)

// JoinOptions configures Join.
type JoinOptions struct {
	// AllowCompact lets other processes short of memory ask this member to compact its live
	// blocks (milliseconds of copying on its GPU) to free whole pages. Without it they get only
	// its free and cached pages.
	AllowCompact bool
}

// Member is one holder's account in a ledger. Safe for concurrent use; Leave (or the ledger's
// Close) releases its slot.
type Member struct {
	l     *Ledger
	slot  int
	name  string
	h     Holder
	flags uint32
	live  int // descriptor holding the slot's liveness lock

	mu        sync.RWMutex // read-held by calls that use the slot; Leave takes it to free the slot
	leaveOnce sync.Once
	left      atomic.Bool
	kick      chan struct{} // a request was served: publish the usage
	stop      chan struct{} // closed by Leave
}

// mailbox request kinds (the low byte of the kind word) and flags.
const (
	kindReclaim = 1
	kindDrop    = 2

	reqCompact = 1 << 8
	reqWait    = 1 << 9
)

// usageEvery is how often a member republishes its usage.
const usageEvery = 500 * time.Millisecond

// Join adds a member under name, unique among live members of the ledger over all processes
// (ErrExists otherwise). A name is 1 to MaxName bytes of valid UTF-8 with no control character
// (a *NameError otherwise). h is asked for memory when others need it.
func (l *Ledger) Join(name string, h Holder, opts JoinOptions) (_ *Member, err error) {
	if err := names.Check("member", name); err != nil {
		return nil, fmt.Errorf("ledger: join: %w", err)
	}
	if h == nil {
		return nil, fmt.Errorf("ledger: join %q: %w: nil holder", name, ErrInvalidArgument)
	}
	g, err := l.enter("join " + name)
	if err != nil {
		return nil, err
	}
	defer l.exit(g, &err)
	if err := l.lock(); err != nil {
		return nil, err
	}
	defer l.unlock()
	if l.closing {
		return nil, fmt.Errorf("ledger: join %q: %w", name, ErrClosed)
	}
	l.reapLocked()
	free := -1
	for i := range MaxMembers {
		switch atomic.LoadUint32(l.s32(i, sState)) {
		case stateLive:
			if l.nameOf(i) == name {
				return nil, fmt.Errorf("ledger: join %q: %w (pid %d)", name, ErrExists, atomic.LoadUint32(l.s32(i, sPID)))
			}
		case stateFree:
			if free < 0 && l.local[i] == nil {
				free = i
			}
		}
	}
	m := &Member{l: l, name: name, h: h, kick: make(chan struct{}, 1), stop: make(chan struct{})}
	if opts.AllowCompact {
		m.flags = flagCompact
	}
	for i := free; i >= 0 && i < MaxMembers; i++ {
		if atomic.LoadUint32(l.s32(i, sState)) != stateFree || l.local[i] != nil {
			continue
		}
		// A descriptor of our own for the liveness lock: the kernel drops it when this process
		// dies, and the ledger descriptor (which reaps) sees it as another owner's.
		fd, err := unix.Open("/proc/self/fd/"+strconv.Itoa(l.fd), unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("ledger: join %q: reopen: %w", name, osError(err))
		}
		if err := ofdLock(fd, lockLiveBase+int64(i), unix.F_WRLCK, false); err != nil {
			unix.Close(fd) // a member of this slot is still leaving: try the next
			continue
		}
		served, err := l.fill(g, i, name, m.flags)
		if err != nil {
			unix.Close(fd)
			return nil, err
		}
		if joinFilled != nil {
			joinFilled()
		}
		// From here on nothing reads the mapping: a fault now would leave the member half
		// registered, a responder counted that never starts.
		m.slot, m.live = i, fd
		l.local[i] = m
		l.responders.Add(2)
		go m.publishLoop()
		go m.respond(served) // requests from here on are ours
		return m, nil
	}
	return nil, fmt.Errorf("ledger: join %q: %w: all %d member slots are taken", name, errdefs.ErrTooLarge, MaxMembers)
}

// joinFilled, when not nil, is called by Join right after it filled the slot (a test hook).
var joinFilled func()

// fill is fillSlot that fails, instead of faulting, when the file was cut short. It returns
// the slot's last request number: the requests after it are the new member's. g is the
// caller's protection.
func (l *Ledger) fill(g guard, i int, name string, flags uint32) (_ uint32, err error) {
	defer l.catch(g, &err)
	l.fillSlot(i, name, flags)
	return atomic.LoadUint32(l.s32(i, sReqSeq)), nil
}

// fillSlot writes a new member into free slot i, its state last (the ledger lock is held).
func (l *Ledger) fillSlot(i int, name string, flags uint32) {
	base := headerSize + i*slotSize
	clear(l.mem[base+sName : base+slotSize])
	copy(l.mem[base+sName:], name)
	for w := range uUpdated + 1 {
		atomic.StoreUint64(l.s64(i, sUsage+8*w), 0)
	}
	atomic.StoreUint64(l.s64(i, sMapped), 0)
	atomic.StoreUint32(l.s32(i, sPID), uint32(os.Getpid()))
	atomic.StoreUint32(l.s32(i, sFlags), flags)
	atomic.StoreUint64(l.s64(i, sJoined), uint64(time.Now().UnixNano()))
	atomic.StoreUint32(l.s32(i, sState), stateLive)
}

// Name returns the member's name.
func (m *Member) Name() string {
	if m == nil {
		return ""
	}
	return m.name
}

// enter is Ledger.enter for a member that has not left; exit undoes it.
func (m *Member) enter(op string) (guard, error) {
	if m == nil || m.l == nil {
		return guard{}, fmt.Errorf("ledger: %s: %w: nil member, or one not made by Join", op, ErrInvalidArgument)
	}
	m.mu.RLock()
	if m.left.Load() {
		m.mu.RUnlock()
		return guard{}, fmt.Errorf("ledger: %s: member %q left: %w", op, m.name, ErrClosed)
	}
	g, err := m.l.enter(op)
	if err != nil {
		m.mu.RUnlock()
		return guard{}, err
	}
	return g, nil
}

// exit is Ledger.exit for a member. It must be the deferred call itself.
func (m *Member) exit(g guard, errp *error) {
	defer m.mu.RUnlock()
	defer m.l.closeMu.RUnlock()
	unprotect(g)
	if r := recover(); r != nil {
		m.l.caught(g, r, errp)
	}
}

// TryAcquire takes n bytes if the limit has room for them now, asking nothing of anyone. It
// fails with a *CapacityError (ErrOutOfMemory) naming the bytes asked for and free.
func (m *Member) TryAcquire(n uint64) (err error) {
	g, err := m.enter("acquire")
	if err != nil {
		return err
	}
	defer m.exit(g, &err)
	return m.tryAcquire(n)
}

func (m *Member) tryAcquire(n uint64) error {
	l := m.l
	if err := l.lock(); err != nil {
		return err
	}
	defer l.unlock()
	used, limit := l.sumMapped(), atomic.LoadUint64(l.u64(hLimit))
	if checked.Over(used, n, limit) > 0 {
		return fmt.Errorf("ledger: member %q: %w", m.name, &CapacityError{Need: n, Free: limit - min(used, limit)})
	}
	atomic.AddUint64(l.s64(m.slot, sMapped), n)
	return nil
}

// Acquire takes n bytes. When the limit is spent it reaps members whose process died, then
// asks the others, largest first, for their free and cached pages, and with compact asks those
// that allow it to compact. The caller may hold its own locks: members are asked not to wait
// for theirs. It fails with a *CapacityError when they cannot make room, at once when n is
// more than the limit.
func (m *Member) Acquire(n uint64, compact bool) (err error) {
	g, err := m.enter("acquire")
	if err != nil {
		return err
	}
	defer m.exit(g, &err)
	if err = m.tryAcquire(n); err == nil || !errors.Is(err, ErrOutOfMemory) {
		return err
	}
	if n > atomic.LoadUint64(m.l.u64(hLimit)) {
		return err // it never fits: asking would only take the others' free pages
	}
	others, rerr := m.l.others(m.slot)
	if rerr != nil {
		return rerr
	}
	if err = m.tryAcquire(n); err == nil || !errors.Is(err, ErrOutOfMemory) {
		return err // a dead member's share came back
	}
	passes := []bool{false}
	if compact {
		passes = append(passes, true)
	}
	for _, withCompaction := range passes {
		for _, o := range others {
			need := m.l.shortfall(n)
			if need == 0 {
				break
			}
			m.l.ask(o, kindReclaim, need, withCompaction, false)
			if err = m.tryAcquire(n); err == nil || !errors.Is(err, ErrOutOfMemory) {
				return err
			}
		}
	}
	return err
}

// shortfall returns how far n more bytes would exceed the limit now (an estimate read without
// the lock).
func (l *Ledger) shortfall(n uint64) uint64 {
	return checked.Over(l.sumMapped(), n, atomic.LoadUint64(l.u64(hLimit)))
}

// others reaps dead members and returns the other live slots, largest holders first.
func (l *Ledger) others(skip int) ([]int, error) {
	if err := l.lock(); err != nil {
		return nil, err
	}
	defer l.unlock()
	l.reapLocked()
	var out []int
	for i := range MaxMembers {
		if i != skip && atomic.LoadUint32(l.s32(i, sState)) == stateLive {
			out = append(out, i)
		}
	}
	slices.SortStableFunc(out, func(a, b int) int { // largest first
		return cmp.Compare(atomic.LoadUint64(l.s64(b, sMapped)), atomic.LoadUint64(l.s64(a, sMapped)))
	})
	return out, nil
}

// Release returns n bytes (at most what the member holds). Safe after Leave (a no-op then).
func (m *Member) Release(n uint64) {
	g, err := m.enter("release")
	if err != nil {
		return
	}
	defer m.exit(g, nil)
	w := m.l.s64(m.slot, sMapped)
	for {
		cur := atomic.LoadUint64(w)
		if atomic.CompareAndSwapUint64(w, cur, cur-min(n, cur)) {
			return
		}
	}
}

// Used returns the bytes the member holds.
func (m *Member) Used() uint64 {
	g, err := m.enter("used")
	if err != nil {
		return 0
	}
	defer m.exit(g, nil)
	return atomic.LoadUint64(m.l.s64(m.slot, sMapped))
}

// Headroom returns the bytes the member could acquire now without asking anyone (an estimate
// read without the lock).
func (m *Member) Headroom() uint64 {
	g, err := m.enter("headroom")
	if err != nil {
		return 0
	}
	defer m.exit(g, nil)
	used, limit := m.l.sumMapped(), atomic.LoadUint64(m.l.u64(hLimit))
	if used >= limit {
		return 0
	}
	return limit - used
}

// Leave frees the member's slot; what it still holds returns to the limit. It does not wait
// for a request the holder is serving (the holder may be the one calling Leave, under its own
// locks): the responder drops that answer and ends, and Ledger.Close waits for it. Leaving twice
// is a no-op.
func (m *Member) Leave() {
	if m == nil || m.l == nil {
		return
	}
	m.leaveOnce.Do(func() {
		l := m.l
		g, err := l.enterAs("leave", true) // a damaged handle's members leave too
		if err != nil {
			return // the ledger closed: Close left every member first
		}
		defer l.exit(g, nil) // a fault on the mapping below still ends the member
		m.mu.Lock()
		m.left.Store(true)
		m.mu.Unlock()
		close(m.stop)
		defer unix.Close(m.live) // drops the liveness lock, last
		defer func() {
			l.mu.Lock()
			l.local[m.slot] = nil
			l.mu.Unlock()
		}()
		atomic.AddUint32(l.s32(m.slot, sReqSeq), 1) // the responder sees left and ends
		wake(l.s32(m.slot, sReqSeq))
		if l.lock() == nil { // else no lock records left: the slot is reaped as a dead member's once ours closes
			defer l.unlock()
			l.clearSlot(m.slot)
		}
	})
}

// publish writes the holder's usage into the slot, unless the member left meanwhile. It fails
// only when the mapping faults (see FaultError); g is the goroutine's protection.
func (m *Member) publish(g guard) (err error) {
	u := m.h.Usage()
	m.mu.RLock()
	defer m.mu.RUnlock()
	defer m.l.catch(g, &err)
	if m.left.Load() {
		return nil
	}
	l, i := m.l, m.slot
	for w, v := range [...]uint64{
		uSequences: uint64(u.Sequences), uLiveBlocks: uint64(u.LiveBlocks), uMappedPages: uint64(u.MappedPages),
		uQueryTokens: u.QueryTokens, uHitTokens: u.HitTokens, uCachedBlocks: uint64(u.CachedBlocks),
		uOverhead: math.Float64bits(u.PageOverhead), uUpdated: uint64(time.Now().UnixNano()),
	} {
		atomic.StoreUint64(l.s64(i, sUsage+8*w), v)
	}
	return nil
}

// respond serves the member's mailbox from request served+1 on, until the member leaves. It
// never waits for the holder's locks on its own (Usage is read by publishLoop): the holder's
// own goroutines may be waiting for another process that is waiting for this answer.
func (m *Member) respond(served uint32) {
	defer m.l.responders.Done()
	g := protect("serve requests")
	defer unprotect(g)
	for !m.left.Load() && !m.l.damaged.Load() { // a damaged handle's slot may not be ours
		seq, err := m.serveNext(g, served)
		if err != nil {
			return // the file was cut short: no request can reach this member any more
		}
		served = seq
	}
}

// serveNext waits up to a second for a request after served, serves it and returns its
// number (served when none came). It fails only when the mapping faults.
func (m *Member) serveNext(g guard, served uint32) (_ uint32, err error) {
	defer m.l.catch(g, &err)
	l, i := m.l, m.slot
	reqSeq := l.s32(i, sReqSeq)
	seq := atomic.LoadUint32(reqSeq)
	if seq == served {
		wait(reqSeq, seq, time.Second)
		return served, nil
	}
	kind := atomic.LoadUint32(l.s32(i, sReqKind))
	need := atomic.LoadUint64(l.s64(i, sReqNeed))
	got := m.serve(kind, need)
	m.answer(seq, got)
	select {
	case m.kick <- struct{}{}: // what it gave back shows in its usage soon
	default:
	}
	return seq, nil
}

// answer acknowledges request seq with got bytes, unless the member left meanwhile (the slot
// may be another member's by now).
func (m *Member) answer(seq uint32, got uint64) {
	m.mu.RLock()
	defer m.mu.RUnlock() // also when the stores fault
	if m.left.Load() {
		return
	}
	l, i := m.l, m.slot
	atomic.StoreUint64(l.s64(i, sAckGot), got)
	atomic.StoreUint32(l.s32(i, sAckSeq), seq)
	wake(l.s32(i, sAckSeq))
}

// publishLoop publishes the holder's usage every usageEvery, and soon after each request it
// served, until the member leaves or the file is cut short.
func (m *Member) publishLoop() {
	defer m.l.responders.Done()
	g := protect("publish usage")
	defer unprotect(g)
	t := time.NewTicker(usageEvery)
	defer t.Stop()
	for {
		if m.l.damaged.Load() || m.publish(g) != nil {
			return
		}
		select {
		case <-m.stop:
			return
		case <-m.kick:
		case <-t.C:
		}
	}
}

// serve carries out one request on the holder and returns the bytes given back.
func (m *Member) serve(kind uint32, need uint64) uint64 {
	switch kind & 0xff {
	case kindDrop:
		m.h.DropCache()
		return 0
	case kindReclaim:
		compact := kind&reqCompact != 0 && m.flags&flagCompact != 0
		if kind&reqWait != 0 {
			return m.h.Reclaim(need, compact, true)
		}
		got := uint64(0)
		for attempt := range 3 { // a holder busy in a short operation is asked again
			freed, busy := vmm.ReclaimNow(m.h, need-got, compact)
			if got += freed; got >= need || !busy {
				break
			}
			time.Sleep(time.Duration(attempt+1) * 20 * time.Microsecond)
		}
		return got
	}
	return 0
}

// ask sends one request to the member in slot i and returns the bytes it gave back: directly
// for a member of this handle, through its mailbox otherwise, waiting at most the request
// timeout (less if the member dies meanwhile).
func (l *Ledger) ask(i int, kind uint32, need uint64, compact, waitLocks bool) uint64 {
	if compact {
		kind |= reqCompact
	}
	if waitLocks {
		kind |= reqWait
	}
	l.mu.Lock()
	local := l.local[i]
	l.mu.Unlock()
	if local != nil {
		return local.serve(kind, need)
	}
	l.reqMu.Lock()
	defer l.reqMu.Unlock()
	if ofdLock(l.fd, lockReqBase+int64(i), unix.F_WRLCK, true) != nil {
		return 0
	}
	defer ofdLock(l.fd, lockReqBase+int64(i), unix.F_UNLCK, false)
	ackSeq := l.s32(i, sAckSeq)
	atomic.StoreUint32(l.s32(i, sReqKind), kind)
	atomic.StoreUint64(l.s64(i, sReqNeed), need)
	seq := atomic.AddUint32(l.s32(i, sReqSeq), 1)
	wake(l.s32(i, sReqSeq))
	deadline := time.Now().Add(l.timeout)
	for {
		a := atomic.LoadUint32(ackSeq)
		if a == seq {
			return atomic.LoadUint64(l.s64(i, sAckGot))
		}
		left := time.Until(deadline)
		if left <= 0 {
			return 0
		}
		if held, err := ofdHeld(l.fd, lockLiveBase+int64(i)); err == nil && !held {
			return 0 // it died or left; the next reap frees a dead member's share
		}
		wait(ackSeq, a, min(left, 50*time.Millisecond))
	}
}
