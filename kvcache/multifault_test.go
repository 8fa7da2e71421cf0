package kvcache_test

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

// faultOps are the driver calls a fault on one device fails.
var faultOps = []vmm.Op{vmm.OpCreate, vmm.OpMap, vmm.OpSetAccess, vmm.OpUnmap, vmm.OpRelease, vmm.OpCopy, vmm.OpCopyIn, vmm.OpCopyOut}

// multiFaultCase is an operation on a manager over several devices that a fault on one device
// may fail: setup builds the state through the harness, do runs the operation.
type multiFaultCase struct {
	name  string
	setup func(h *harness)
	do    func(h *harness) error
	// compacts: a failure to return a page after the moves leaves the compaction standing
	// (Compact's contract), so only the data and the invariants are checked then.
	compacts bool
}

// runMultiFaults fails, on each device k of n in turn, the call-th call of each driver
// operation during c.do, on a fresh manager each time, until the operation makes no more such
// calls. Every failure must be ErrInjected, name the device, and leave the manager, every
// device's memory and every device's data exactly as before.
func runMultiFaults(t *testing.T, cfg kvcache.Config, split kvcache.Split, c multiFaultCase) {
	n := max(split.TensorParallel, 1) * max(split.PipelineParallel, 1)
	for k := range n {
		for _, op := range faultOps {
			for call := 1; ; call++ {
				hit := false
				t.Run(fmt.Sprintf("%s/%d devices/device %d/%s %d", c.name, n, k, op, call), func(t *testing.T) {
					devs, faults := faultyHostDevices(t, n)
					h := newMultiHarness(t, devs, cfg, split)
					c.setup(h)
					require.NoError(t, h.m.Settle())
					before, free0 := shape(h.m.Stats()), freeOf(t, devs)
					base := faults[k].Calls(op)
					require.NoError(t, faults[k].FailNth(op, call, nil))
					err := c.do(h)
					hit = faults[k].Calls(op)-base >= call
					faults[k].Clear()
					if err == nil {
						require.NoError(t, h.m.Verify(), "succeeded despite the fault")
						return
					}
					require.ErrorIs(t, err, vmm.ErrInjected)
					require.Contains(t, err.Error(), fmt.Sprintf("device %d", k), "the error names the device")
					if !c.compacts || op != vmm.OpUnmap {
						require.Equal(t, before, shape(h.m.Stats()))
						require.Equal(t, free0, freeOf(t, devs), "every device as before")
					}
					h.check()
				})
				if !hit || t.Failed() {
					break
				}
			}
		}
	}
}

func TestMultiFaultProbe(t *testing.T) {
	cfg := multiConfig()
	cfg.HostBlocks = 16
	cases := []multiFaultCase{
		{"swap out", func(h *harness) {
			h.step(opAppend, 1, 0, exactly(4*4+1))
			h.step(opAppend, 2, 0, exactly(3))
		}, func(h *harness) error {
			sw, err := h.m.SwapOut([]kvcache.SeqID{1}, 0)
			if err == nil {
				err = sw.Wait()
				sw.Close()
			}
			return err
		}, false},
		{"swap in", func(h *harness) {
			h.step(opAppend, 1, 0, exactly(4*4+1))
			h.step(opAppend, 2, 0, exactly(3))
			h.swap(true, 1)
		}, func(h *harness) error {
			sw, err := h.m.SwapIn([]kvcache.SeqID{1}, 0)
			if err == nil {
				err = sw.Wait()
				sw.Close()
			}
			return err
		}, false},
		{"copy on write", func(h *harness) {
			h.step(opAppend, 1, 0, exactly(6))
			h.step(opFork, 1, 2, arg{})
		}, func(h *harness) error {
			_, err := h.m.AppendTokens(2, 1, nil)
			return err
		}, false},
		{"sleep", func(h *harness) {
			for s := range 8 {
				h.step(opAppend, byte(s), 0, exactly(4))
			}
			for s := 1; s < 8; s += 2 {
				h.step(opFree, byte(s), 0, arg{})
			}
		}, func(h *harness) error {
			_, err := h.m.Sleep()
			return err
		}, true},
	}
	for _, split := range []kvcache.Split{{TensorParallel: 2}, {TensorParallel: 2, PipelineParallel: 2}, {TensorParallel: 4, PipelineParallel: 2}, {}} {
		for _, c := range cases {
			runMultiFaults(t, cfg, split, c)
		}
	}
}

// Close failing on device k of n (an unmap, a release, the reservation's free) says which
// device, and a second Close returns everything on every device.
func TestMultiCloseFails(t *testing.T) {
	cfg := multiConfig()
	cfg.HostBlocks = 16
	for _, split := range []kvcache.Split{{TensorParallel: 2}, {TensorParallel: 2, PipelineParallel: 2}, {TensorParallel: 8}} {
		n := max(split.TensorParallel, 1) * max(split.PipelineParallel, 1)
		for k := range n {
			for _, op := range []vmm.Op{vmm.OpUnmap, vmm.OpRelease, vmm.OpFreeReservation} {
				for call := 1; ; call++ {
					devs, faults := faultyHostDevices(t, n)
					free0 := freeOf(t, devs)
					m, err := kvcache.NewMulti(devs, cfg, split)
					require.NoError(t, err)
					for s := range 3 {
						_, err := m.AppendTokens(kvcache.SeqID(s), 4*4, nil)
						require.NoError(t, err)
					}
					require.NoError(t, faults[k].FailNth(op, call, nil))
					base := faults[k].Calls(op)
					err = m.Close()
					hit := faults[k].Calls(op)-base >= call
					faults[k].Clear()
					if err != nil {
						require.ErrorIs(t, err, vmm.ErrInjected)
						require.Contains(t, err.Error(), fmt.Sprintf("device %d", k), "%s call %d", op, call)
						require.NoError(t, m.Close(), "a second Close returns the rest")
					}
					require.ErrorIs(t, m.Close(), kvcache.ErrClosed)
					require.Equal(t, free0, freeOf(t, devs), "%d devices, device %d, %s call %d: every device's memory back", n, k, op, call)
					if !hit {
						break
					}
				}
			}
		}
	}
}
