package ledger

import (
	"errors"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Byte ranges of the file's locks; they lie past the end of the file, which POSIX allows, so
// they never overlap the data the locks guard.
const (
	lockLedger   = 1 << 40
	lockLiveBase = lockLedger + 1<<20 // + slot
	lockReqBase  = lockLedger + 2<<20 // + slot
)

// ofdLock takes (typ F_WRLCK) or drops (F_UNLCK) the write lock on one byte of fd's file,
// waiting for it when wait is set.
func ofdLock(fd int, off int64, typ int16, wait bool) error {
	cmd := unix.F_OFD_SETLK
	if wait {
		cmd = unix.F_OFD_SETLKW
	}
	lk := unix.Flock_t{Type: typ, Whence: 0, Start: off, Len: 1}
	for {
		err := unix.FcntlFlock(uintptr(fd), cmd, &lk)
		if err != unix.EINTR {
			return err
		}
	}
}

// ofdHeld reports whether another open file description holds a lock on the byte at off.
func ofdHeld(fd int, off int64) (bool, error) {
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: off, Len: 1}
	if err := unix.FcntlFlock(uintptr(fd), unix.F_OFD_GETLK, &lk); err != nil {
		return false, err
	}
	return lk.Type != unix.F_UNLCK, nil
}

const (
	futexWait = 0 // FUTEX_WAIT, shared between processes (not FUTEX_PRIVATE_FLAG)
	futexWake = 1
)

// wait sleeps while *w == val, at most d; it returns early on a wake, a signal or a change.
func wait(w *uint32, val uint32, d time.Duration) {
	if atomic.LoadUint32(w) != val {
		return
	}
	ts := unix.NsecToTimespec(int64(d))
	unix.Syscall6(unix.SYS_FUTEX, uintptr(unsafe.Pointer(w)), futexWait, uintptr(val), uintptr(unsafe.Pointer(&ts)), 0, 0)
}

// wake wakes every process sleeping on w.
func wake(w *uint32) {
	unix.Syscall6(unix.SYS_FUTEX, uintptr(unsafe.Pointer(w)), futexWake, 1<<30, 0, 0, 0)
}

var errBusy = errors.New("busy")
