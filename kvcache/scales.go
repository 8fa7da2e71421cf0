package kvcache

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"

	"github.com/pagedkv/pagedkv/internal/checked"
	"github.com/pagedkv/pagedkv/vmm"
)

// ScaleAddrs are where an fp8 group's per-layer scales live in one device's memory: the fp32 K
// scale of the group's j-th layer (in LayerGroup.Layers' order) at K + 4*j, its V scale at
// V + 4*j. V is 0 for a group that stores K only (MLA).
type ScaleAddrs struct {
	K, V vmm.Addr
}

// scaleTable keeps a Hybrid's fp8 scales in device memory, where kernels read them: on each
// device one mapping of one granule (or more, for very many layers), holding for each fp8
// group its K scales and then its V scales, each run on a 256-byte boundary. It is outside
// the budget, as blocktable.DeviceTables are: a granule per device. Written once, at NewHybrid;
// read-only afterwards, so it needs no lock.
type scaleTable struct {
	pools  []*vmm.Pool    // one per device; after close, those the device did not take back
	addrs  [][]ScaleAddrs // [device][group]; zero for a group that is not fp8
	closed bool           // close was called: the addresses are no longer valid
}

// newScaleTable maps and fills the scales of g's fp8 groups on every device; it returns nil
// when no group is fp8. On an error nothing stays mapped.
func newScaleTable(devs []vmm.Device, g Geometry) (*scaleTable, error) {
	type run struct{ k, v uint64 } // offsets
	runs := make([]run, len(g.Groups))
	off, any := uint64(0), false
	next := func(n int) uint64 {
		o := off
		off += (4*uint64(n) + 255) &^ 255
		return o
	}
	for i, grp := range g.Groups {
		if !grp.DType.FP8() {
			continue
		}
		any = true
		runs[i].k = next(len(grp.KScales))
		if len(grp.VScales) > 0 {
			runs[i].v = next(len(grp.VScales))
		}
	}
	if !any {
		return nil, nil
	}
	t := &scaleTable{}
	for d, dev := range devs {
		size, ok := checked.RoundUp(off, dev.Info().Granularity)
		if !ok {
			return nil, t.fail(fmt.Errorf("kvcache: fp8 scales on device %d: %w: granularity %d", d, ErrInvalidArgument, dev.Info().Granularity))
		}
		pool, err := vmm.NewPool(dev, vmm.PoolConfig{Capacity: size, PageSize: size})
		if err != nil {
			return nil, t.fail(fmt.Errorf("kvcache: fp8 scales on device %d: %w", d, err))
		}
		t.pools = append(t.pools, pool)
		base, err := pool.Map(0, size)
		if err != nil {
			return nil, t.fail(fmt.Errorf("kvcache: fp8 scales on device %d: %w", d, err))
		}
		addrs := make([]ScaleAddrs, len(g.Groups))
		for i, grp := range g.Groups {
			if !grp.DType.FP8() {
				continue
			}
			addrs[i].K = base + vmm.Addr(runs[i].k)
			if err := dev.CopyIn(addrs[i].K, float32Bytes(grp.KScales)); err != nil {
				return nil, t.fail(fmt.Errorf("kvcache: fp8 scales of group %d on device %d: %w", i, d, err))
			}
			if len(grp.VScales) > 0 {
				addrs[i].V = base + vmm.Addr(runs[i].v)
				if err := dev.CopyIn(addrs[i].V, float32Bytes(grp.VScales)); err != nil {
					return nil, t.fail(fmt.Errorf("kvcache: fp8 scales of group %d on device %d: %w", i, d, err))
				}
			}
		}
		t.addrs = append(t.addrs, addrs)
	}
	return t, nil
}

// fail closes what t mapped and returns err.
func (t *scaleTable) fail(err error) error {
	_ = t.close()
	return err
}

// close unmaps the scales on every device. A pool the device did not take back stays, so that
// a later close tries it again.
func (t *scaleTable) close() error {
	if t == nil {
		return nil
	}
	t.closed = true
	var errs []error
	left := t.pools[:0]
	for d, p := range t.pools {
		if err := p.Close(); err != nil {
			errs = append(errs, fmt.Errorf("fp8 scales on device %d: %w", d, err))
			left = append(left, p)
		}
	}
	clear(t.pools[len(left):])
	t.pools = left
	return errors.Join(errs...)
}

// open reports whether close left memory on a device.
func (t *scaleTable) open() bool { return t != nil && len(t.pools) > 0 }

// float32Bytes returns the little-endian bytes of v, as the device reads fp32.
func float32Bytes(v []float32) []byte {
	b := make([]byte, 0, 4*len(v))
	for _, x := range v {
		b = binary.LittleEndian.AppendUint32(b, math.Float32bits(x))
	}
	return b
}

// Scales returns where fp8 group i keeps its per-layer K and V scales on device dev (0 on a
// Hybrid of one device; NewHybridMulti's order otherwise): the Geometry's KScales and VScales,
// copied there by NewHybrid as fp32, valid and unchanged until Close. Kernels that read their
// scales from device memory take them as vLLM's reshape_and_cache_flash and attention take
// k_scale and v_scale (kernels.KVWrite and kernels.Attention: KScaleAt, VScaleAt). The Hybrid
// owns the memory: one granule per device, outside the budget, as blocktable.DeviceTables
// are. A group that is not fp8, or an index out of range, is an error.
func (h *Hybrid) Scales(group, dev int) (ScaleAddrs, error) {
	if !h.made() {
		return ScaleAddrs{}, fmt.Errorf("kvcache: scales: %w", errHybridNotMade)
	}
	if group < 0 || group >= len(h.geom.Groups) {
		return ScaleAddrs{}, fmt.Errorf("kvcache: scales: %w", &CountError{What: "group index", N: group, Max: len(h.geom.Groups) - 1})
	}
	if !h.geom.Groups[group].DType.FP8() {
		return ScaleAddrs{}, &GroupOpError{Group: group, Name: h.geom.Groups[group].Name,
			Err: fmt.Errorf("kvcache: scales: %w: %s K/V has no scales", ErrInvalidArgument, h.geom.Groups[group].DType)}
	}
	devs := len(h.pool.devs)
	if dev < 0 || dev >= devs {
		return ScaleAddrs{}, fmt.Errorf("kvcache: scales: %w", &CountError{What: "device index", N: dev, Max: devs - 1})
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.scales == nil || h.scales.closed {
		return ScaleAddrs{}, fmt.Errorf("kvcache: scales: %w", ErrClosed)
	}
	return h.scales.addrs[dev][group], nil
}
