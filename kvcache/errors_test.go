package kvcache_test

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/blocktable"
	"github.com/pagedkv/pagedkv/kvcache"
)

// A MemoryLimit below one page is refused at New, naming the setting and the page size, instead
// of a manager that holds no block and says only "at most 0 blocks" at the first append.
func TestMemoryLimitBelowOnePage(t *testing.T) {
	dev := hostDevice(t, 4096)
	cfg := tinyConfig()
	cfg.MemoryLimit = cfg.PageSize - 1
	_, err := kvcache.New(dev, cfg)
	var ce *kvcache.ConfigError
	require.ErrorAs(t, err, &ce)
	require.Equal(t, "MemoryLimit", ce.Field)
	require.ErrorIs(t, err, kvcache.ErrInvalidArgument)
	require.Contains(t, err.Error(), "32768", "the page size")

	cfg.MemoryLimit = cfg.PageSize
	m := newManager(t, dev, cfg)
	_, err = m.AppendTokens(1, 4*cfg.BlockTokens+1, nil)
	require.ErrorIs(t, err, kvcache.ErrTooLarge)
	require.Contains(t, err.Error(), "at most 4 blocks (MemoryLimit 32768 bytes)", "the setting that bounds the arena")
}

// An append larger than the arena names Capacity; texts name each layer once.
func TestTooLargeNamesCapacity(t *testing.T) {
	m := newManager(t, hostDevice(t, 4096), tinyConfig())
	_, err := m.AppendTokens(2, 1<<20, nil)
	require.ErrorIs(t, err, kvcache.ErrTooLarge)
	require.Equal(t, "kvcache: append sequence 2: does not fit: 1048576 tokens need 262144 blocks (2147483648 bytes); the arena holds at most 256 blocks (Capacity 2097152 bytes)", err.Error())
	_, err = m.AppendTokens(2, -1, nil)
	require.Equal(t, "kvcache: append sequence 2: invalid argument: tokens -1 is negative", err.Error())
	require.False(t, strings.Contains(err.Error(), "pagedkv"))
}

// A nil table is a call error, not "sequence 0".
func TestExportNilTable(t *testing.T) {
	m := newManager(t, hostDevice(t, 4096), tinyConfig())
	err := m.ExportVLLM([]kvcache.SeqID{0}, nil)
	require.ErrorIs(t, err, kvcache.ErrInvalidArgument)
	require.Equal(t, "kvcache: export: invalid argument: nil vLLM table", err.Error())
	err = m.ExportFlashInfer(nil, nil)
	require.Equal(t, "kvcache: export: invalid argument: nil FlashInfer table", err.Error())
	fi, err := blocktable.NewFlashInfer(1, 1, 16)
	require.NoError(t, err)
	err = m.ExportFlashInfer(nil, fi)
	require.ErrorIs(t, err, kvcache.ErrInvalidArgument)
	require.NotContains(t, err.Error(), "sequence")
}

// A shared limit below a model's page is refused at Register, and the model is not added.
func TestSharedLimitBelowOnePage(t *testing.T) {
	dev := hostDevice(t, 4096)
	sp, err := kvcache.NewShared(dev, kvcache.SharedConfig{Limit: 16 << 10})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, sp.Close()) })
	_, err = sp.Register("tiny", tinyConfig())
	var ce *kvcache.ConfigError
	require.ErrorAs(t, err, &ce)
	require.Equal(t, "SharedConfig.Limit", ce.Field)
	_, err = sp.Model("tiny")
	require.ErrorIs(t, err, kvcache.ErrNotFound, "the refused model is not in the pool")
	_, err = sp.Register("tiny", kvcache.Config{Layers: 1, KVHeads: 1, HeadDim: 64, ElemSize: 2, BlockTokens: 16,
		PageSize: 16 << 10, Capacity: 1 << 20, NoBackground: true})
	require.NoError(t, err, "a model whose page fits")
}
