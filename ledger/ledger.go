package ledger

import (
	"errors"
	"fmt"
	"math"
	"os"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/pagedkv/pagedkv/internal/checked"
	"github.com/pagedkv/pagedkv/internal/errdefs"
	"github.com/pagedkv/pagedkv/internal/names"
	"github.com/pagedkv/pagedkv/vmm"
)

// Sentinel errors, shared with the rest of pagedkv.
var (
	ErrInvalidArgument = errdefs.ErrInvalidArgument
	ErrOutOfMemory     = errdefs.ErrOutOfMemory
	ErrClosed          = errdefs.ErrClosed
	ErrExists          = errdefs.ErrExists
	ErrNotFound        = errdefs.ErrNotFound
)

// MaxMembers is how many members a ledger holds at once, over all processes.
const MaxMembers = 64

// MaxName is the longest member name, in bytes.
const MaxName = names.Max

// NameError reports a member name that breaks the naming rule; it matches ErrInvalidArgument.
// It is the same type as kvcache.NameError.
type NameError = errdefs.NameError

// File layout. Every field is naturally aligned and read and written atomically, so a process
// that dies mid-update leaves no torn value.
const (
	magic   = 0x4c564b4445474150 // "PAGEDKVL"
	version = 1

	hMagic, hVersion, hLimit, hDevice = 0, 8, 16, 24
	headerSize                        = 256

	sState, sPID, sFlags, sReqSeq, sAckSeq, sReqKind = 0, 4, 8, 12, 16, 20
	sReqNeed, sAckGot, sMapped, sJoined              = 24, 32, 40, 48
	sUsage                                           = 56 // usageFields uint64s
	sName                                            = 160
	slotSize                                         = 256

	fileSize = headerSize + MaxMembers*slotSize
)

const (
	stateFree = 0
	stateLive = 1

	flagCompact = 1 // the member lets others ask it to compact
)

// Options configures Open.
type Options struct {
	// Limit is the bytes all members together may map. It is used when Open creates the ledger
	// (then it must be positive) and ignored when the ledger exists: its limit changes only
	// through SetLimit (pagedkvctl limit).
	Limit uint64
	// DeviceBytes is the GPU's memory, recorded when the ledger has none yet, so that limits can
	// be given in percent. 0 leaves it unknown.
	DeviceBytes uint64
	// RequestTimeout bounds how long one request to another process waits for its answer (a
	// process that is stopped, or compacting a large cache); 0 means 2 s.
	RequestTimeout time.Duration
	// Mode is the file's permission bits when Open creates it; 0 means 0600.
	Mode os.FileMode
	// MustExist opens only a ledger that exists (ErrNotFound otherwise): what tools that
	// watch or steer one (pagedkvctl) want, so that a mistyped path creates nothing.
	MustExist bool
}

// Ledger is one process's handle on a ledger file. Safe for concurrent use; Close releases the
// mapping, the descriptors and every member still joined through it.
type Ledger struct {
	path    string
	fd      int
	mem     []byte
	timeout time.Duration

	mu         sync.Mutex          // with the ledger's file lock: goroutines of one handle share one lock owner
	reqMu      sync.Mutex          // one mailbox conversation at a time from this handle
	local      [MaxMembers]*Member // guarded by mu
	closing    bool                // guarded by mu: Close has begun, Join lets no one in
	responders sync.WaitGroup      // the members' responder goroutines: Close waits for them
	closed     atomic.Bool
	damaged    atomic.Bool  // a fault on the mapping was caught: calls fail with a *FaultError
	closeMu    sync.RWMutex // held for reading while the mapping is in use; Close takes it for writing
}

// Open maps the ledger at path, creating it (with opts.Limit) if it does not exist. Processes
// open the same path to share the limit; the path is usually under /dev/shm. Without a limit it
// creates no file and formats no empty one.
func Open(path string, opts Options) (*Ledger, error) {
	if path == "" {
		return nil, fmt.Errorf("ledger: open: %w: empty path", ErrInvalidArgument)
	}
	mode := opts.Mode
	if mode == 0 {
		mode = 0o600
	}
	flags := unix.O_RDWR | unix.O_CLOEXEC
	if !opts.MustExist && opts.Limit != 0 { // without a limit no new ledger can be made: create no file
		flags |= unix.O_CREAT
	}
	fd, err := unix.Open(path, flags, uint32(mode.Perm()))
	if err != nil {
		if errors.Is(err, unix.ENOENT) && !opts.MustExist {
			return nil, fmt.Errorf("ledger: open %s: %w", path, errNoLimit)
		}
		return nil, fmt.Errorf("ledger: open %s: %w", path, osError(err))
	}
	l := &Ledger{path: path, fd: fd, timeout: opts.RequestTimeout}
	if l.timeout <= 0 {
		l.timeout = 2 * time.Second
	}
	if err := ofdLock(fd, lockLedger, unix.F_WRLCK, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("ledger: open %s: lock: %w", path, osError(err))
	}
	err = l.initGuarded(opts)
	ofdLock(fd, lockLedger, unix.F_UNLCK, false)
	if err != nil {
		if l.mem != nil {
			unix.Munmap(l.mem)
		}
		unix.Close(fd)
		return nil, fmt.Errorf("ledger: open %s: %w", path, osError(err))
	}
	return l, nil
}

// errNoLimit is Open's error for a ledger it would have to make without a limit.
var errNoLimit = fmt.Errorf("%w: a new ledger needs a positive limit", ErrInvalidArgument)

// initGuarded is initLocked that fails, instead of faulting, when another process cuts the
// file short meanwhile.
func (l *Ledger) initGuarded(opts Options) (err error) {
	g := protect("open")
	defer unprotect(g)
	defer l.catch(g, &err)
	return l.initLocked(opts)
}

// initLocked sizes, maps and (for a new file) formats the ledger; the ledger lock is held.
func (l *Ledger) initLocked(opts Options) error {
	var st unix.Stat_t
	if err := unix.Fstat(l.fd, &st); err != nil {
		return err
	}
	if opts.MustExist && st.Size == 0 {
		return fmt.Errorf("%w: an empty file, not a ledger", ErrNotFound)
	}
	if st.Size != 0 && st.Size != fileSize {
		return fmt.Errorf("%w: %d bytes, a ledger has %d", ErrInvalidArgument, st.Size, fileSize)
	}
	if st.Size == 0 {
		if opts.Limit == 0 {
			return errNoLimit
		}
		if err := unix.Ftruncate(l.fd, fileSize); err != nil {
			return err
		}
	}
	mem, err := unix.Mmap(l.fd, 0, fileSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return err
	}
	l.mem = mem
	switch m := atomic.LoadUint64(l.u64(hMagic)); {
	case m == 0: // new, or its creator died before finishing: format it
		if opts.Limit == 0 {
			return errNoLimit
		}
		clear(l.mem)
		atomic.StoreUint64(l.u64(hLimit), opts.Limit)
		atomic.StoreUint64(l.u64(hDevice), opts.DeviceBytes)
		atomic.StoreUint32(l.u32(hVersion), version)
		atomic.StoreUint64(l.u64(hMagic), magic) // last: the ledger is whole from here on
	case m != magic || atomic.LoadUint32(l.u32(hVersion)) != version:
		return fmt.Errorf("%w: not a pagedkv ledger (magic %#x, version %d; want %#x, %d)", ErrInvalidArgument,
			m, atomic.LoadUint32(l.u32(hVersion)), uint64(magic), version)
	default:
		if atomic.LoadUint64(l.u64(hDevice)) == 0 && opts.DeviceBytes != 0 {
			atomic.StoreUint64(l.u64(hDevice), opts.DeviceBytes)
		}
	}
	return nil
}

// Path returns the ledger file's path.
func (l *Ledger) Path() string {
	if l == nil {
		return ""
	}
	return l.path
}

func (l *Ledger) u64(off int) *uint64 { return (*uint64)(unsafe.Pointer(&l.mem[off])) }
func (l *Ledger) u32(off int) *uint32 { return (*uint32)(unsafe.Pointer(&l.mem[off])) }

func (l *Ledger) s64(slot, off int) *uint64 { return l.u64(headerSize + slot*slotSize + off) }
func (l *Ledger) s32(slot, off int) *uint32 { return l.u32(headerSize + slot*slotSize + off) }

// enter makes sure l is open and not damaged, and keeps its mapping in place until exit.
// Until then a fault on the mapping (the file cut short by another process) is recovered, not
// fatal.
func (l *Ledger) enter(op string) (guard, error) { return l.enterAs(op, false) }

// enterAs is enter that, with damagedOK, lets a damaged handle in (for Leave).
func (l *Ledger) enterAs(op string, damagedOK bool) (guard, error) {
	if l == nil || l.mem == nil {
		return guard{}, fmt.Errorf("ledger: %s: %w: nil ledger, or one not made by Open", op, ErrInvalidArgument)
	}
	l.closeMu.RLock()
	if l.closed.Load() {
		l.closeMu.RUnlock()
		return guard{}, fmt.Errorf("ledger: %s: %w", op, ErrClosed)
	}
	if !damagedOK && l.damaged.Load() {
		l.closeMu.RUnlock()
		return guard{}, l.faultError(op)
	}
	return protect(op), nil
}

// exit ends what enter began. A fault on the mapping since becomes a *FaultError in *errp
// (dropped when errp is nil). It must be the deferred call itself, for recover to see the
// panic.
func (l *Ledger) exit(g guard, errp *error) {
	defer l.closeMu.RUnlock()
	unprotect(g)
	if r := recover(); r != nil {
		l.caught(g, r, errp)
	}
}

// lock takes the ledger lock: the handle's mutex, then the file lock. It fails only when the
// kernel runs out of lock records (ENOLCK).
func (l *Ledger) lock() error {
	l.mu.Lock()
	if err := ofdLock(l.fd, lockLedger, unix.F_WRLCK, true); err != nil {
		l.mu.Unlock()
		return fmt.Errorf("ledger: lock %s: %w", l.path, osError(err))
	}
	return nil
}

func (l *Ledger) unlock() {
	ofdLock(l.fd, lockLedger, unix.F_UNLCK, false)
	l.mu.Unlock()
}

// Limit returns the limit in bytes (0 for a closed or nil ledger).
func (l *Ledger) Limit() uint64 {
	g, err := l.enter("limit")
	if err != nil {
		return 0
	}
	defer l.exit(g, nil)
	return atomic.LoadUint64(l.u64(hLimit))
}

// DeviceBytes returns the GPU memory recorded in the ledger (0 when unknown).
func (l *Ledger) DeviceBytes() uint64 {
	g, err := l.enter("device bytes")
	if err != nil {
		return 0
	}
	defer l.exit(g, nil)
	return atomic.LoadUint64(l.u64(hDevice))
}

// Used returns the bytes all members hold, dead ones not yet reaped included. It reads without
// the lock, so under concurrent acquisitions it is a moment's estimate; Members is exact.
func (l *Ledger) Used() uint64 {
	g, err := l.enter("used")
	if err != nil {
		return 0
	}
	defer l.exit(g, nil)
	return l.sumMapped()
}

// sumMapped adds up the live slots' bytes with atomic reads: exact under the ledger lock, a
// moment's estimate without it.
func (l *Ledger) sumMapped() uint64 {
	sum := uint64(0)
	for i := range MaxMembers {
		if atomic.LoadUint32(l.s32(i, sState)) == stateLive {
			sum = addSat(sum, atomic.LoadUint64(l.s64(i, sMapped)))
		}
	}
	return sum
}

// addSat returns a+b, or MaxUint64 where that overflows: counts in a corrupted file must not
// wrap to a small sum that leaves room under the limit.
func addSat(a, b uint64) uint64 {
	if s, ok := checked.Add(a, b); ok {
		return s
	}
	return math.MaxUint64
}

// reapLocked frees the slots of members whose process died: marked live, liveness byte not
// held. It returns their names. Slots of this handle's own members are never reaped.
func (l *Ledger) reapLocked() []string {
	var dead []string
	for i := range MaxMembers {
		if atomic.LoadUint32(l.s32(i, sState)) != stateLive || l.local[i] != nil {
			continue
		}
		held, err := ofdHeld(l.fd, lockLiveBase+int64(i))
		if err != nil || held {
			continue
		}
		dead = append(dead, l.nameOf(i))
		l.clearSlot(i)
	}
	return dead
}

// clearSlot frees slot i (the ledger lock is held), its state last: a process that dies midway
// leaves a live slot whose owner is gone, which the next reap frees.
func (l *Ledger) clearSlot(i int) {
	atomic.StoreUint64(l.s64(i, sMapped), 0)
	atomic.StoreUint32(l.s32(i, sPID), 0)
	clear(l.mem[headerSize+i*slotSize+sName : headerSize+(i+1)*slotSize])
	atomic.StoreUint32(l.s32(i, sState), stateFree)
}

func (l *Ledger) nameOf(i int) string {
	b := l.mem[headerSize+i*slotSize+sName : headerSize+i*slotSize+sName+MaxName+1]
	n := 0
	for n < len(b) && b[n] != 0 {
		n++
	}
	return string(b[:n])
}

// Close leaves every member still joined through this handle and unmaps the ledger; the file
// stays for the other processes. A Join while it runs, and a second Close, return ErrClosed.
func (l *Ledger) Close() error {
	if l == nil || l.mem == nil {
		return fmt.Errorf("ledger: close: %w: nil ledger, or one not made by Open", ErrInvalidArgument)
	}
	l.mu.Lock()
	again := l.closing
	l.closing = true // a member joined from here on would be neither left nor waited for
	l.mu.Unlock()
	if again {
		return fmt.Errorf("ledger: close: %w", ErrClosed)
	}
	for i := range MaxMembers {
		l.mu.Lock()
		m := l.local[i]
		l.mu.Unlock()
		if m != nil {
			m.Leave()
		}
	}
	l.responders.Wait()
	l.closeMu.Lock()
	defer l.closeMu.Unlock()
	l.closed.Store(true)
	err := unix.Munmap(l.mem)
	if cerr := unix.Close(l.fd); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("ledger: close: %w", osError(err))
	}
	return nil
}

// osError gives an error of the OS a pagedkv sentinel: ErrNotFound for a missing file,
// ErrOutOfMemory for memory, disk or lock records exhausted, ErrInvalidArgument for the rest (a
// directory, a file without permission, a descriptor already closed). Errors that carry a
// sentinel already pass unchanged.
func osError(err error) error {
	for _, s := range []error{ErrInvalidArgument, ErrOutOfMemory, ErrNotFound, ErrClosed, ErrExists} {
		if errors.Is(err, s) {
			return err
		}
	}
	switch {
	case errors.Is(err, unix.ENOENT):
		return fmt.Errorf("%w: %w", ErrNotFound, err)
	case errors.Is(err, unix.ENOMEM), errors.Is(err, unix.ENOSPC), errors.Is(err, unix.ENOLCK):
		return fmt.Errorf("%w: %w", ErrOutOfMemory, err)
	}
	return fmt.Errorf("%w: %w", ErrInvalidArgument, err)
}

// CapacityError is the error of an acquisition the limit cannot hold: vmm's, with the bytes
// asked for and free.
type CapacityError = vmm.CapacityError
