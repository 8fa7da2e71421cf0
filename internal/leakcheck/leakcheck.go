// Package leakcheck counts the driver objects that the vmm backends hold (reservations,
// physical handles, mappings) so that every test binary can fail when one outlives its test.
//
// The backends call Add on every create and destroy; tests call Check (per test) and Main (per
// binary). The counters are process-wide and cost one atomic add per driver call.
package leakcheck

import (
	"fmt"
	"os"
	"sync/atomic"
	"testing"
)

// Kind is a class of driver object.
type Kind int

// The classes of driver object that are counted.
const (
	Reservation Kind = iota
	Handle
	Mapping
	numKinds
)

var names = [numKinds]string{"reservations", "handles", "mappings"}

var live [numKinds]atomic.Int64

// Add records delta objects of kind k made (positive) or destroyed (negative).
func Add(k Kind, delta int64) { live[k].Add(delta) }

// Counts is a snapshot of the live objects of each kind.
type Counts [numKinds]int64

// Snapshot returns the live counts now.
func Snapshot() Counts {
	var c Counts
	for i := range live {
		c[i] = live[i].Load()
	}
	return c
}

// String returns a readable form.
func (c Counts) String() string {
	return fmt.Sprintf("%d %s, %d %s, %d %s", c[0], names[0], c[1], names[1], c[2], names[2])
}

// Check fails tb at its end if the live counts differ from those at the call. It must not be
// used by tests that run in parallel with other tests creating driver objects.
func Check(tb testing.TB) {
	tb.Helper()
	before := Snapshot()
	tb.Cleanup(func() {
		if after := Snapshot(); after != before {
			tb.Errorf("leak: driver objects live before the test: %v; after: %v", before, after)
		}
	})
}

// Main runs the tests of a binary and exits non-zero if any driver object is still live at the
// end. Use it as the body of TestMain.
func Main(m *testing.M) {
	code := m.Run()
	if c := Snapshot(); c != (Counts{}) {
		fmt.Fprintf(os.Stderr, "leakcheck: %v still live after all tests\n", c)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}
