package disk

import (
	"errors"
	"fmt"
	"io/fs"
	"strings"
	"sync"
	"syscall"
)

// ErrFault is the error a Fault returns.
var ErrFault = errors.New("injected fault")

// Fault fails the Nth call (counting from 1 after Arm) of one file operation ("open", "write",
// "read", "truncate", "rename" (matched on its source) or "remove") on a file whose path contains match. For "write" and "read"
// the path is followed by "@" and the offset: "@12288" matches a record at that offset.
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

// at names a record for hit: its file and offset, formatted only where op is armed.
func (f *Fault) at(op, path string, off int64) error {
	f.mu.Lock()
	armed := f.op == op
	f.mu.Unlock()
	if !armed {
		return nil
	}
	return f.hit(op, fmt.Sprintf("%s@%d", path, off))
}

func (f *Fault) open(path string, create bool) (int, error) {
	if err := f.hit("open", path); err != nil {
		return -1, err
	}
	return f.inner.open(path, create)
}

func (f *Fault) write(fd int, path string, rec []byte, off int64) error {
	if err := f.at("write", path, off); err != nil {
		return err
	}
	return f.inner.write(fd, path, rec, off)
}

func (f *Fault) read(fd int, path string, buf []byte, off int64) (int, error) {
	if f.OnRead != nil {
		f.OnRead(path)
	}
	if err := f.at("read", path, off); err != nil {
		return 0, err
	}
	return f.inner.read(fd, path, buf, off)
}

func (f *Fault) truncate(fd int, path string, size int64) error {
	if err := f.hit("truncate", path); err != nil {
		return err
	}
	return f.inner.truncate(fd, path, size)
}

func (f *Fault) rename(from, to string) error {
	if err := f.hit("rename", from); err != nil {
		return err
	}
	return f.inner.rename(from, to)
}

func (f *Fault) close(fd int) error { return f.inner.close(fd) }

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

// SetEvictionQueue bounds the evictions s queues for TakeEvictions at n instead of
// EvictionQueue.
func SetEvictionQueue(s *Store, n int) {
	s.mu.Lock()
	s.evictCap = n
	s.mu.Unlock()
}
