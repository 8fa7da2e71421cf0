package kvcache_test

import (
	"encoding/binary"
	"errors"
	"math"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/vmm"
)

// fp8Hybrid is smallHybrid with its window group in fp8 e4m3 (K and V scales for its 2 layers)
// and its MLA group in fp8 e5m2 (K scales only).
func fp8Hybrid() kvcache.Geometry {
	g := smallHybrid(false)
	g.Groups[1].DType, g.Groups[1].KScales, g.Groups[1].VScales = kvcache.FP8E4M3, []float32{0.5, 0.125}, []float32{0.25, 3}
	g.Groups[3].DType, g.Groups[3].KScales = kvcache.FP8E5M2, []float32{1.0 / 64}
	return g
}

// scalesOn reads n fp32 values at addr.
func scalesOn(t *testing.T, dev vmm.Device, addr vmm.Addr, n int) []float32 {
	t.Helper()
	b := make([]byte, 4*n)
	require.NoError(t, dev.CopyOut(b, addr))
	v := make([]float32, n)
	for i := range v {
		v[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
	}
	return v
}

// A Hybrid keeps every fp8 group's per-layer scales in device memory, where kernels read them
// (kernels.KVWrite.KScaleAt): Scales names the addresses, which hold the geometry's scales as
// fp32 until Close. Groups without scales, indexes out of range and a closed Hybrid are typed
// errors.
func TestHybridScales(t *testing.T) {
	backends(t, func(t *testing.T, dev vmm.Device) {
		g := fp8Hybrid()
		h, err := kvcache.NewHybrid(dev, kvcache.HybridConfig{Geometry: g, Limit: 256 << 20, Capacity: 64 << 20, NoBackground: true})
		require.NoError(t, err)
		w, err := h.Scales(1, 0)
		require.NoError(t, err)
		require.Equal(t, g.Groups[1].KScales, scalesOn(t, dev, w.K, 2))
		require.Equal(t, g.Groups[1].VScales, scalesOn(t, dev, w.V, 2))
		require.Zero(t, w.K%4)
		mla, err := h.Scales(3, 0)
		require.NoError(t, err)
		require.Equal(t, g.Groups[3].KScales, scalesOn(t, dev, mla.K, 1))
		require.Zero(t, mla.V, "a K-only group has no V scales")

		_, err = h.Scales(0, 0)
		var gerr *kvcache.GroupOpError
		require.ErrorAs(t, err, &gerr)
		require.ErrorIs(t, err, kvcache.ErrInvalidArgument)
		require.Contains(t, err.Error(), "bfloat16 K/V has no scales")
		for _, c := range [][2]int{{-1, 0}, {4, 0}, {1, 1}, {1, -1}} {
			_, err := h.Scales(c[0], c[1])
			var cerr *kvcache.CountError
			require.ErrorAs(t, err, &cerr, "group %d, device %d", c[0], c[1])
		}
		require.NoError(t, h.Close())
		_, err = h.Scales(1, 0)
		require.ErrorIs(t, err, kvcache.ErrClosed)
		require.ErrorIs(t, h.Close(), kvcache.ErrClosed)
		_, err = (*kvcache.Hybrid)(nil).Scales(1, 0)
		require.ErrorIs(t, err, kvcache.ErrInvalidArgument)

		// Without fp8 groups nothing is mapped for scales.
		h2 := newHybrid(t, dev, smallHybrid(false))
		_, err = h2.Scales(1, 0)
		require.ErrorIs(t, err, kvcache.ErrInvalidArgument)
	})
}

// On several devices every device holds every layer's scales (a scale is per layer, whatever
// share of the heads a device has).
func TestHybridMultiScales(t *testing.T) {
	devs := hostDevices(t, 2)
	g := fp8Hybrid()
	h, err := kvcache.NewHybridMulti(devs, kvcache.HybridConfig{Geometry: g, Capacity: 64 << 20, NoBackground: true},
		kvcache.Split{TensorParallel: 2})
	require.NoError(t, err)
	defer func() { require.NoError(t, h.Close()) }()
	for d, dev := range devs {
		w, err := h.Scales(1, d)
		require.NoError(t, err)
		require.Equal(t, g.Groups[1].KScales, scalesOn(t, dev, w.K, 2), "device %d", d)
		require.Equal(t, g.Groups[1].VScales, scalesOn(t, dev, w.V, 2), "device %d", d)
	}
	_, err = h.Scales(1, 2)
	var cerr *kvcache.CountError
	require.ErrorAs(t, err, &cerr)
}

// A driver call failing while the scales are put in place fails NewHybrid with the driver's
// error and leaves nothing mapped (the leak check of TestMain counts every mapping): each
// mapping and copy of the construction fails in turn.
func TestHybridScalesFaults(t *testing.T) {
	injected := errors.New("injected")
	for _, op := range []vmm.Op{vmm.OpCopyIn, vmm.OpMap, vmm.OpReserve, vmm.OpCreate} {
		for n := 1; ; n++ {
			fd := vmm.InjectFaults(hostDevice(t, 4<<10))
			require.NoError(t, fd.FailNth(op, n, injected))
			h, err := kvcache.NewHybrid(fd, kvcache.HybridConfig{Geometry: fp8Hybrid(), Limit: 256 << 20, Capacity: 64 << 20, NoBackground: true})
			if err == nil {
				require.NoError(t, h.Close())
				require.Greater(t, n, 1, "%s: the construction makes at least one such call", op)
				break
			}
			require.ErrorIs(t, err, injected, "%s #%d", op, n)
			require.Nil(t, h)
		}
	}
}

// A Close that reports an error from a group (here a swap never closed, ErrNotClosed) still
// unmaps the scales: Scales is then ErrClosed, and the leak check of hostDevice finds no mapping
// left. A second Close is ErrClosed.
func TestHybridCloseFreesScalesAfterAGroupError(t *testing.T) {
	dev := hostDevice(t, 4<<10)
	h, err := kvcache.NewHybrid(dev, kvcache.HybridConfig{Geometry: fp8Hybrid(), Limit: 256 << 20, Capacity: 64 << 20, NoBackground: true, HostTokens: 64})
	require.NoError(t, err)
	_, err = h.AppendTokens(1, 20, make([][]int64, h.Groups()))
	require.NoError(t, err)
	sw, err := h.SwapOut([]kvcache.SeqID{1}, 0)
	require.NoError(t, err)
	require.NoError(t, sw.Wait())

	require.ErrorIs(t, h.Close(), kvcache.ErrNotClosed, "the swap was never closed")
	_, err = h.Scales(1, 0)
	require.ErrorIs(t, err, kvcache.ErrClosed, "the scales went with the groups")
	require.ErrorIs(t, h.Close(), kvcache.ErrClosed)
	require.NoError(t, sw.Close())
}
