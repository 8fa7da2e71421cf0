package eventbench

import (
	"runtime"
	"time"

	"golang.org/x/sys/unix"
)

// threadCPU returns the CPU time the calling OS thread has run so far, or -1 when the clock
// cannot be read. The caller locks its goroutine to the thread (runtime.LockOSThread) between
// two readings that it compares.
func threadCPU() time.Duration {
	var ts unix.Timespec
	if unix.ClockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts) != nil {
		return -1
	}
	return time.Duration(ts.Nano())
}

// timedSteps runs n decode steps of d locked to one OS thread and returns their wall time and
// the thread's CPU time over them (-1 if the clock failed): the CPU time leaves out what the
// thread waited for a core that other work held.
func timedSteps(d *Decoder, n int) (wall, cpu time.Duration, err error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	c0 := threadCPU()
	wall, err = d.Steps(n)
	c1 := threadCPU()
	if c0 < 0 || c1 < 0 {
		return wall, -1, err
	}
	return wall, c1 - c0, err
}
