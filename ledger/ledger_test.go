package ledger_test

import (
	"bufio"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/testutil/proctest"
	"github.com/pagedkv/pagedkv/ledger"
)

const unit = 4096

func TestMain(m *testing.M) {
	proctest.Main(map[string]proctest.Role{"hold": hold, "hammer": hammer})
	os.Exit(m.Run())
}

// holder is a member's memory: free bytes it gives back when asked, a cache it drops.
type holder struct {
	mu       sync.Mutex
	m        *ledger.Member
	free     uint64
	cached   int
	reclaims int
}

func (h *holder) Reclaim(need uint64, compact, wait bool) uint64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.reclaims++
	if h.m == nil {
		return 0
	}
	give := min(need, h.free)
	h.free -= give
	h.m.Release(give)
	return give
}

// TryReclaim is Reclaim that is never busy (its lock is held only for a moment).
func (h *holder) TryReclaim(need uint64, compact bool) (uint64, bool) {
	return h.Reclaim(need, compact, false), false
}

func (h *holder) DropCache() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.cached = 0
}

func (h *holder) Usage() ledger.Usage {
	h.mu.Lock()
	defer h.mu.Unlock()
	return ledger.Usage{CachedBlocks: h.cached, Sequences: h.reclaims}
}

func join(t testing.TB, l *ledger.Ledger, name string) (*ledger.Member, *holder) {
	t.Helper()
	h := &holder{}
	m, err := l.Join(name, h, ledger.JoinOptions{})
	require.NoError(t, err)
	h.mu.Lock()
	h.m = m
	h.mu.Unlock()
	return m, h
}

// hang is how long a test waits for what must happen (a child's answer, a member's reply to a
// request, a published usage) before it fails: a guard against a hang, long enough that a
// loaded machine never reaches it. No test passes or fails by how fast something happens.
const hang = time.Minute

// open opens the ledger at path with a request timeout of hang: members asked for memory
// always answer in time, however the processes are scheduled.
func open(t testing.TB, path string, limit uint64) *ledger.Ledger {
	t.Helper()
	l, err := ledger.Open(path, ledger.Options{Limit: limit, RequestTimeout: hang})
	require.NoError(t, err)
	t.Cleanup(func() { l.Close() })
	return l
}

// hold joins path as name, takes live+free bytes (free ones it gives back when asked, cached
// blocks it drops when asked), says "ready", then answers "used" and "acquire N" until stdin
// ends.
func hold(args []string, in *bufio.Scanner, out io.Writer) error {
	path, name := args[0], args[1]
	live, _ := strconv.ParseUint(args[2], 10, 64)
	free, _ := strconv.ParseUint(args[3], 10, 64)
	l, err := ledger.Open(path, ledger.Options{})
	if err != nil {
		return err
	}
	defer l.Close()
	h := &holder{cached: 5}
	m, err := l.Join(name, h, ledger.JoinOptions{})
	if err != nil {
		return err
	}
	h.mu.Lock()
	h.m, h.free = m, free
	h.mu.Unlock()
	if err := m.Acquire(live+free, false); err != nil {
		return err
	}
	fmt.Fprintln(out, "ready")
	for in.Scan() {
		var n uint64
		if line := in.Text(); line == "used" {
			fmt.Fprintln(out, "used", m.Used())
		} else if _, err := fmt.Sscanf(line, "acquire %d", &n); err == nil {
			fmt.Fprintln(out, "acquire", m.Acquire(n, false))
		}
	}
	m.Leave()
	return nil
}

// hammer is one of the processes of TestConcurrentAcquisitions, joined to args[0] as args[1].
// It takes a base share of 9 units and says "ready"; on "go" it asks once for 2 more units and
// says "contended granted" or "contended refused"; on "run" it returns what it holds, then
// acquires and releases 1-4 units args[2] times, holding at most 8 chunks, checking under the
// ledger's lock that the members never hold more than the limit and that it holds what it
// thinks. It reports "done ok fail". Its random choices are seeded by its name.
func hammer(args []string, in *bufio.Scanner, out io.Writer) error {
	path, name := args[0], args[1]
	iters, _ := strconv.Atoi(args[2])
	l, err := ledger.Open(path, ledger.Options{RequestTimeout: 300 * time.Millisecond})
	if err != nil {
		return err
	}
	defer l.Close()
	m, err := l.Join(name, &holder{}, ledger.JoinOptions{})
	if err != nil {
		return err
	}
	held := uint64(9 * unit)
	if err := m.Acquire(held, false); err != nil {
		return err
	}
	fmt.Fprintln(out, "ready")
	if err := expectLine(in, "go"); err != nil {
		return err
	}
	switch err := m.Acquire(2*unit, true); {
	case err == nil:
		held += 2 * unit
		fmt.Fprintln(out, "contended granted")
	case errors.Is(err, ledger.ErrOutOfMemory):
		fmt.Fprintln(out, "contended refused")
	default:
		return err
	}
	if err := expectLine(in, "run"); err != nil {
		return err
	}
	m.Release(held)
	seed := fnv.New64a()
	seed.Write([]byte(name))
	rng := rand.New(rand.NewPCG(seed.Sum64(), 7))
	var chunks []uint64
	held = 0
	ok, fail := 0, 0
	for i := range iters {
		n := uint64(1+rng.IntN(4)) * unit
		if err := m.Acquire(n, true); err != nil {
			if !errors.Is(err, ledger.ErrOutOfMemory) {
				return err
			}
			fail++
		} else {
			ok++
			chunks = append(chunks, n)
			held += n
		}
		for len(chunks) > 8 || (len(chunks) > 0 && rng.IntN(3) == 0) {
			m.Release(chunks[0])
			held -= chunks[0]
			chunks = chunks[1:]
		}
		if i%25 == 0 {
			s, err := l.Snapshot()
			if err != nil {
				return err
			}
			if s.Used > s.Limit {
				return fmt.Errorf("members hold %d bytes over a limit of %d", s.Used, s.Limit)
			}
			if got := m.Used(); got != held {
				return fmt.Errorf("the ledger says %s holds %d bytes, it holds %d", name, got, held)
			}
		}
	}
	for _, c := range chunks {
		m.Release(c)
	}
	m.Leave()
	fmt.Fprintln(out, "done", ok, fail)
	return nil
}

// expectLine reads the next line from the test and fails unless it is want.
func expectLine(in *bufio.Scanner, want string) error {
	if !in.Scan() {
		return fmt.Errorf("stdin ended before %q: %v", want, in.Err())
	}
	if in.Text() != want {
		return fmt.Errorf("got %q, want %q", in.Text(), want)
	}
	return nil
}

func TestOpenBadInput(t *testing.T) {
	dir := t.TempDir()
	_, err := ledger.Open("", ledger.Options{Limit: 1})
	require.ErrorIs(t, err, ledger.ErrInvalidArgument)
	_, err = ledger.Open(filepath.Join(dir, "new"), ledger.Options{})
	require.ErrorIs(t, err, ledger.ErrInvalidArgument, "a new ledger needs a limit")
	require.NoError(t, os.WriteFile(filepath.Join(dir, "short"), []byte("hello"), 0o600))
	_, err = ledger.Open(filepath.Join(dir, "short"), ledger.Options{Limit: 1})
	require.ErrorIs(t, err, ledger.ErrInvalidArgument)
	require.ErrorContains(t, err, "5 bytes")
	junk := make([]byte, 256+64*256)
	copy(junk, "NOTALEDGER")
	require.NoError(t, os.WriteFile(filepath.Join(dir, "junk"), junk, 0o600))
	_, err = ledger.Open(filepath.Join(dir, "junk"), ledger.Options{Limit: 1})
	require.ErrorIs(t, err, ledger.ErrInvalidArgument)
	_, err = ledger.Open(filepath.Join(dir, "no", "such", "dir"), ledger.Options{Limit: 1})
	require.Error(t, err)

	var nilL *ledger.Ledger
	require.ErrorIs(t, nilL.Close(), ledger.ErrInvalidArgument)
	_, err = nilL.Join("x", &holder{}, ledger.JoinOptions{})
	require.ErrorIs(t, err, ledger.ErrInvalidArgument)
	_, err = nilL.Snapshot()
	require.ErrorIs(t, err, ledger.ErrInvalidArgument)
	require.Zero(t, nilL.Limit())
	var nilM *ledger.Member
	require.ErrorIs(t, nilM.Acquire(1, true), ledger.ErrInvalidArgument)
	nilM.Release(1)
	nilM.Leave()
	require.Zero(t, nilM.Used())

	l, err := ledger.Open(filepath.Join(dir, "l"), ledger.Options{Limit: 10 * unit})
	require.NoError(t, err)
	for _, name := range []string{"", string(make([]byte, 64)), "a\x00b"} {
		_, err = l.Join(name, &holder{}, ledger.JoinOptions{})
		require.ErrorIs(t, err, ledger.ErrInvalidArgument, "%q", name)
	}
	_, err = l.Join("x", nil, ledger.JoinOptions{})
	require.ErrorIs(t, err, ledger.ErrInvalidArgument)
	m, _ := join(t, l, "a")
	_, err = l.Join("a", &holder{}, ledger.JoinOptions{})
	require.ErrorIs(t, err, ledger.ErrExists)
	_, err = l.SetLimit(0)
	require.ErrorIs(t, err, ledger.ErrInvalidArgument)
	require.Equal(t, uint64(10*unit), l.Limit(), "a refused limit changes nothing")
	err = m.Acquire(11*unit, true)
	var ce *ledger.CapacityError
	require.ErrorAs(t, err, &ce)
	require.Equal(t, ledger.CapacityError{Need: 11 * unit, Free: 10 * unit}, *ce)
	require.Zero(t, m.Used(), "a refused acquisition takes nothing")
	require.ErrorAs(t, m.Acquire(math.MaxUint64, true), &ce, "no wrap-around")
	require.NoError(t, m.Acquire(10*unit, false))
	require.ErrorAs(t, m.TryAcquire(1), &ce)
	require.Equal(t, uint64(0), ce.Free)
	m.Release(math.MaxUint64)
	require.Zero(t, m.Used(), "releasing more than held releases what is held")

	require.NoError(t, l.Close())
	require.ErrorIs(t, l.Close(), ledger.ErrClosed)
	require.ErrorIs(t, m.Acquire(1, false), ledger.ErrClosed, "Close left the member")
	_, err = l.Join("b", &holder{}, ledger.JoinOptions{})
	require.ErrorIs(t, err, ledger.ErrClosed)
	_, err = l.SetLimit(5)
	require.ErrorIs(t, err, ledger.ErrClosed)
}

// Two handles on one file in one process behave as two processes: separate locks, mailboxes
// served by the members' responders.
func TestTwoHandles(t *testing.T) {
	path := filepath.Join(t.TempDir(), "l")
	a, b := open(t, path, 16*unit), open(t, path, 0)
	ma, ha := join(t, a, "a")
	mb, hb := join(t, b, "b")
	require.NoError(t, ma.Acquire(12*unit, false))
	ha.mu.Lock()
	ha.free = 8 * unit
	ha.mu.Unlock()
	require.NoError(t, mb.Acquire(10*unit, false), "b needs 6 units of a's 8 free")
	require.Equal(t, uint64(6*unit), ma.Used())
	require.Equal(t, uint64(10*unit), mb.Used())
	var ce *ledger.CapacityError
	require.ErrorAs(t, mb.Acquire(3*unit, false), &ce, "a has 2 free units, b needs 3")
	require.Equal(t, uint64(4*unit), ma.Used(), "a gave back its last 2 free units anyway")
	require.Equal(t, uint64(14*unit), a.Used())

	hb.mu.Lock()
	hb.free = 2 * unit
	hb.mu.Unlock()
	r, err := a.SetLimit(10 * unit)
	require.NoError(t, err)
	require.Equal(t, ledger.LimitReport{Limit: 10 * unit, Used: 12 * unit, Shortfall: 2 * unit}, r,
		"b gave its 2 free units; the rest is live")
	s, err := b.Snapshot()
	require.NoError(t, err)
	require.Equal(t, uint64(10*unit), s.Limit)
	require.Len(t, s.Members, 2)
	require.Equal(t, "a", s.Members[0].Name)
	require.Equal(t, os.Getpid(), s.Members[1].PID)

	ha.mu.Lock()
	ha.cached = 7
	ha.mu.Unlock()
	n, err := b.DropCache("a")
	require.NoError(t, err)
	require.Equal(t, 1, n)
	require.Zero(t, ha.Usage().CachedBlocks)
	require.Eventually(t, func() bool {
		s, err := b.Snapshot()
		return err == nil && s.Members[0].Usage.CachedBlocks == 0
	}, hang, time.Millisecond, "a publishes its usage soon after a request")
	_, err = b.DropCache("nobody")
	require.ErrorIs(t, err, ledger.ErrNotFound)

	ma.Leave()
	ma.Leave()
	mb.Release(8 * unit)
	require.NoError(t, a.Check())
	s, err = a.Snapshot()
	require.NoError(t, err)
	require.Len(t, s.Members, 1)
	require.Zero(t, s.Used)
}

// A member killed with SIGKILL while holding most of the limit is reaped by the next member
// short of memory, which then gets the whole limit.
func TestKilledMemberIsReaped(t *testing.T) {
	path := filepath.Join(t.TempDir(), "l")
	l := open(t, path, 32*unit)
	child := proctest.Start(t, "hold", path, "victim", strconv.Itoa(24*unit), "0")
	child.Expect("ready", hang)
	m, _ := join(t, l, "survivor")
	var ce *ledger.CapacityError
	require.ErrorAs(t, m.Acquire(9*unit, true), &ce, "the victim holds 24 of 32 units")
	require.Equal(t, uint64(8*unit), ce.Free)
	child.Kill9()
	require.NoError(t, m.Acquire(32*unit, true), "the victim's share came back")
	s, err := l.Snapshot()
	require.NoError(t, err)
	require.Len(t, s.Members, 1)
	require.Equal(t, uint64(32*unit), s.Used)
	require.NoError(t, l.Check())
}

// A member in another process gives back its free bytes when asked; a limit lowered by another
// process is honoured; its cache is dropped on request.
func TestAcrossProcesses(t *testing.T) {
	path := filepath.Join(t.TempDir(), "l")
	l := open(t, path, 32*unit)
	child := proctest.Start(t, "hold", path, "other", strconv.Itoa(8*unit), strconv.Itoa(16*unit))
	child.Expect("ready", hang)
	m, _ := join(t, l, "me")
	require.NoError(t, m.Acquire(20*unit, false), "8 free units, 12 from the other's reserve")
	child.Send("used")
	require.Equal(t, strconv.Itoa(12*unit), child.Expect("used ", hang))

	n, err := l.DropCache("other")
	require.NoError(t, err)
	require.Equal(t, 1, n)
	require.Eventually(t, func() bool {
		s, err := l.Snapshot()
		return err == nil && s.Members[0].Usage.CachedBlocks == 0
	}, hang, time.Millisecond, "the other publishes its usage soon after a request")

	m.Release(20 * unit)
	r, err := l.SetLimit(10 * unit)
	require.NoError(t, err)
	require.Equal(t, uint64(10*unit), r.Used, "the other gave back 2 of its 4 free units")
	child.Send("acquire %d", unit)
	require.Contains(t, child.Expect("acquire ", hang), "out of memory", "the new limit binds the other process")
	child.Close()
	require.NoError(t, l.Check())
}

// A stopped process does not hang the others: its mailbox times out. Once it runs again, it
// answers.
func TestStoppedMemberTimesOut(t *testing.T) {
	path := filepath.Join(t.TempDir(), "l")
	l := open(t, path, 8*unit)
	child := proctest.Start(t, "hold", path, "sleeper", strconv.Itoa(4*unit), strconv.Itoa(4*unit))
	child.Expect("ready", hang)
	require.NoError(t, syscall.Kill(child.PID(), syscall.SIGSTOP))
	require.Eventually(t, func() bool { // the signal is delivered asynchronously
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", child.PID()))
		return err == nil && strings.Contains(string(stat), ") T ")
	}, hang, time.Millisecond)
	short, err := ledger.Open(path, ledger.Options{RequestTimeout: 100 * time.Millisecond})
	require.NoError(t, err)
	t.Cleanup(func() { short.Close() })
	impatient, _ := join(t, short, "impatient")
	var ce *ledger.CapacityError
	require.ErrorAs(t, impatient.Acquire(2*unit, false), &ce, "a stopped process cannot answer")
	require.NoError(t, syscall.Kill(child.PID(), syscall.SIGCONT))
	patient, _ := join(t, l, "patient")
	// Awake, it answers: the first ask may meet the timed-out request it serves first, so ask
	// until it has given back its free units (the hang guard bounds the wait).
	require.Eventually(t, func() bool { return patient.Acquire(2*unit, false) == nil }, hang, 10*time.Millisecond,
		"awake, it gives back its free units")
}

// Four processes contend for the limit on purpose: each holds 9 of 40 units, then all ask for
// 2 more at once with nothing released in between, so exactly two are granted and two refused
// whichever runs first. Then they acquire and release 1,000 times each, running into the limit
// as the scheduler lets them; the ledger never lets them hold more than the limit, each holds
// what it thinks, and when they are done the ledger is empty and whole.
func TestConcurrentAcquisitions(t *testing.T) {
	path := filepath.Join(t.TempDir(), "l")
	l := open(t, path, 40*unit)
	var kids []*proctest.Child
	for i := range 4 {
		kids = append(kids, proctest.Start(t, "hammer", path, fmt.Sprintf("p%d", i), "1000"))
	}
	for _, k := range kids {
		k.Expect("ready", hang)
	}
	s, err := l.Snapshot()
	require.NoError(t, err)
	require.Len(t, s.Members, 4)
	require.Equal(t, uint64(36*unit), s.Used)

	for _, k := range kids {
		k.Send("go")
	}
	results := map[string]int{}
	for _, k := range kids {
		results[k.Expect("contended ", hang)]++
	}
	require.Equal(t, map[string]int{"granted": 2, "refused": 2}, results, "4 free units, four asks of 2")
	s, err = l.Snapshot()
	require.NoError(t, err)
	require.Equal(t, uint64(40*unit), s.Used, "the limit is reached")

	for _, k := range kids {
		k.Send("run")
	}
	ok, fail := 0, 0
	for _, k := range kids {
		var o, f int
		_, err := fmt.Sscan(k.Expect("done ", hang), &o, &f)
		require.NoError(t, err)
		require.Equal(t, 1000, o+f)
		k.Close()
		ok, fail = ok+o, fail+f
	}
	t.Logf("the loops: %d acquisitions granted, %d refused at the limit", ok, fail)
	// The loops' first acquisition finds at most 31 units held (the others' shares of 11, 11
	// and 9 at most: their own first acquisitions come later), so room for its 4 at most.
	require.Positive(t, ok)
	s, err = l.Snapshot()
	require.NoError(t, err)
	require.Empty(t, s.Members)
	require.Zero(t, s.Used)
	require.NoError(t, l.Check())
}

// badNames break the naming rule: empty, 64 bytes, 5,000 NULs, invalid UTF-8, a control
// character.
var badNames = []string{"", strings.Repeat("x", 64), strings.Repeat("\x00", 5000), "bad\xffutf8", "new\nline"}

// A name breaking the naming rule is refused with a *NameError naming the layer once, and the
// ledger gets no member; a name of MaxName bytes joins.
func TestJoinNames(t *testing.T) {
	l := open(t, filepath.Join(t.TempDir(), "l"), 8*unit)
	for _, name := range badNames {
		_, err := l.Join(name, &holder{}, ledger.JoinOptions{})
		var ne *ledger.NameError
		require.ErrorAs(t, err, &ne, "%q", name)
		require.ErrorIs(t, err, ledger.ErrInvalidArgument)
		require.Equal(t, name, ne.Name)
		require.True(t, strings.HasPrefix(err.Error(), "ledger: join: member name "), err.Error())
		require.NotContains(t, err.Error(), "pagedkv:")
		s, err := l.Snapshot()
		require.NoError(t, err)
		require.Empty(t, s.Members, "a refused name adds no member")
	}
	m, _ := join(t, l, strings.Repeat("x", ledger.MaxName))
	s, err := l.Snapshot()
	require.NoError(t, err)
	require.Len(t, s.Members, 1)
	require.Equal(t, m.Name(), s.Members[0].Name)
	require.NoError(t, l.Check())
}

// stuckHolder is a holder whose TryReclaim blocks until release is closed, after closing
// entered: a member busy answering a request when its ledger closes.
type stuckHolder struct {
	holder
	entered, release chan struct{}
}

func (h *stuckHolder) TryReclaim(need uint64, compact bool) (uint64, bool) {
	close(h.entered)
	<-h.release
	return 0, false
}

// Close refuses members that join while it runs. It leaves every member first, then waits for
// their responders; a member let in meanwhile would be neither left nor waited for, and its
// goroutines would go on writing to the unmapped ledger.
func TestJoinDuringClose(t *testing.T) {
	path := filepath.Join(t.TempDir(), "l")
	closing, other := open(t, path, 4*unit), open(t, path, 0)
	sh := &stuckHolder{entered: make(chan struct{}), release: make(chan struct{})}
	busy, err := closing.Join("busy", sh, ledger.JoinOptions{})
	require.NoError(t, err)
	require.NoError(t, busy.Acquire(4*unit, false))
	asker, _ := join(t, other, "asker")
	acquired := make(chan error, 1)
	go func() { acquired <- asker.Acquire(unit, false) }()
	<-sh.entered // busy's responder serves asker's request until release
	closed := make(chan error, 1)
	go func() { closed <- closing.Close() }()
	// asker gets its unit once Close has left busy; Close then waits for busy's responder.
	require.NoError(t, <-acquired)
	late, joinErr := closing.Join("late", &holder{}, ledger.JoinOptions{})
	if joinErr == nil {
		late.Leave() // else its goroutines outlive the mapping
	}
	close(sh.release)
	require.NoError(t, <-closed)
	require.ErrorIs(t, joinErr, ledger.ErrClosed, "a member joined during Close")
	s, err := other.Snapshot()
	require.NoError(t, err)
	require.Len(t, s.Members, 1)
	require.Equal(t, "asker", s.Members[0].Name)
	require.NoError(t, other.Check())
}

// An Open that fails for want of a limit leaves the file system as it was: it creates no file,
// and an empty file stays empty, so that a tool opening the path later is told that no ledger
// exists, not that one needs a limit.
func TestOpenWithoutLimitCreatesNothing(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "new")
	_, err := ledger.Open(path, ledger.Options{})
	require.ErrorIs(t, err, ledger.ErrInvalidArgument, "a new ledger needs a limit")
	_, err = os.Stat(path)
	require.ErrorIs(t, err, os.ErrNotExist, "a refused Open created the file")
	_, err = ledger.Open(path, ledger.Options{MustExist: true})
	require.ErrorIs(t, err, ledger.ErrNotFound)

	empty := filepath.Join(dir, "empty")
	require.NoError(t, os.WriteFile(empty, nil, 0o600))
	_, err = ledger.Open(empty, ledger.Options{})
	require.ErrorIs(t, err, ledger.ErrInvalidArgument)
	st, err := os.Stat(empty)
	require.NoError(t, err)
	require.Zero(t, st.Size(), "a refused Open grew the file")
	_, err = ledger.Open(empty, ledger.Options{MustExist: true})
	require.ErrorIs(t, err, ledger.ErrNotFound)
	l := open(t, empty, 8*unit)
	require.Equal(t, uint64(8*unit), l.Limit())
}

// An acquisition larger than the limit can never be granted, so it fails at once and asks no
// other member to give back its free pages.
func TestAcquireOverLimitAsksNobody(t *testing.T) {
	path := filepath.Join(t.TempDir(), "l")
	a, b := open(t, path, 16*unit), open(t, path, 0)
	ma, ha := join(t, a, "a")
	mb, _ := join(t, b, "b")
	require.NoError(t, ma.Acquire(8*unit, false))
	ha.mu.Lock()
	ha.free = 8 * unit
	ha.mu.Unlock()
	for _, n := range []uint64{16*unit + 1, math.MaxUint64} {
		var ce *ledger.CapacityError
		require.ErrorAs(t, mb.Acquire(n, true), &ce)
		require.Equal(t, ledger.CapacityError{Need: n, Free: 8 * unit}, *ce)
	}
	require.Equal(t, uint64(8*unit), ma.Used(), "a kept its free pages")
	require.Zero(t, ha.Usage().Sequences, "a was asked for nothing") // holder.Usage counts reclaims there
	require.NoError(t, mb.Acquire(16*unit, false), "a request within the limit still gets a's free pages")
	require.Zero(t, ma.Used())
}
