package disk

import (
	"errors"
	"io/fs"
	"strings"
	"sync"
	"syscall"
)

// ErrFault is the error a Fault returns.
var ErrFault = errors.New("injected fault")

// Fault fails the Nth call (counting from 1 after Arm) of one file operation ("write", "read",
// "rename" or "remove") on a path that contains match.
type Fault struct {
	inner fileIO
	mu    sync.Mutex
	op    string
	n     int
	match string
	err   error
	// OnRead, when set, runs before every read, outside the store's lock.
	OnRead func(path string)
}

// Arm makes the nth next call of op on a path containing match fail.
func (f *Fault) Arm(op string, n int, match string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.op, f.n, f.match, f.err = op, n, match, ErrFault
}

// ArmErrno is Arm with the error the filesystem would give: errno in an *fs.PathError, as the
// real file I/O returns it (ENOSPC from a full disk, EROFS from a read-only mount).
func (f *Fault) ArmErrno(op string, n int, match string, errno syscall.Errno) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.op, f.n, f.match, f.err = op, n, match, errno
}

func (f *Fault) hit(op, path string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.op != op || f.n == 0 || !strings.Contains(path, f.match) {
		return nil
	}
	f.n--
	if f.n == 0 {
		f.op = ""
		if errno, ok := f.err.(syscall.Errno); ok {
			return &fs.PathError{Op: op, Path: path, Err: errno}
		}
		return f.err
	}
	return nil
}

func (f *Fault) write(path string, rec []byte, overwrite bool) error {
	if err := f.hit("write", path); err != nil {
		return err
	}
	return f.inner.write(path, rec, overwrite)
}

func (f *Fault) read(path string, buf []byte) (int, error) {
	if f.OnRead != nil {
		f.OnRead(path)
	}
	if err := f.hit("read", path); err != nil {
		return 0, err
	}
	return f.inner.read(path, buf)
}

func (f *Fault) rename(from, to string) error {
	if err := f.hit("rename", from); err != nil {
		return err
	}
	return f.inner.rename(from, to)
}

func (f *Fault) remove(path string) error {
	if err := f.hit("remove", path); err != nil {
		return err
	}
	return f.inner.remove(path)
}

// OpenFaulty opens a store whose file I/O goes through the returned Fault.
func OpenFaulty(dir string, opt Options) (*Store, *Fault, error) {
	f := &Fault{}
	s, err := open(dir, opt, func(io fileIO) fileIO { f.inner = io; return f })
	return s, f, err
}
