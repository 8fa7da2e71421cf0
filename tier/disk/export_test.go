package disk

import (
	"errors"
	"sync"
)

// ErrFault is the error a Fault returns.
var ErrFault = errors.New("injected fault")

// Fault fails the Nth call (counting from 1 after Arm) of one file operation: "write", "read",
// "rename" or "remove".
type Fault struct {
	inner fileIO
	mu    sync.Mutex
	op    string
	n     int
}

// Arm makes the nth next call of op fail.
func (f *Fault) Arm(op string, n int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.op, f.n = op, n
}

func (f *Fault) hit(op string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.op != op || f.n == 0 {
		return nil
	}
	f.n--
	if f.n == 0 {
		f.op = ""
		return ErrFault
	}
	return nil
}

func (f *Fault) write(path string, rec []byte) error {
	if err := f.hit("write"); err != nil {
		return err
	}
	return f.inner.write(path, rec)
}

func (f *Fault) read(path string, buf []byte) (int, error) {
	if err := f.hit("read"); err != nil {
		return 0, err
	}
	return f.inner.read(path, buf)
}

func (f *Fault) rename(from, to string) error {
	if err := f.hit("rename"); err != nil {
		return err
	}
	return f.inner.rename(from, to)
}

func (f *Fault) remove(path string) error {
	if err := f.hit("remove"); err != nil {
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
