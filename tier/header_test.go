package tier_test

import (
	"encoding/binary"
	"hash/crc32"
	"math"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier"
)

func block(ns prefix.Namespace, n int) tier.Block {
	b := tier.Block{NS: ns, Data: make([]byte, n)}
	b.Parent = prefix.Root(ns, 16)
	b.Key[0], b.Key[31] = 7, 9
	for i := range b.Data {
		b.Data[i] = byte(i*31 + 5)
	}
	return b
}

func TestEncodeCheckRoundTrip(t *testing.T) {
	fp := tier.Fingerprint{1, 2, 3}
	for _, ns := range []prefix.Namespace{{}, {Adapter: 3}, {Adapter: 1 << 63, Salt: "tenant-a"}, {Salt: "x"}} {
		b := block(ns, 1000)
		buf, err := tier.Encode(nil, fp, b)
		require.NoError(t, err)
		require.Len(t, buf, tier.HeaderSize(ns)+1000)
		h, err := tier.ParseHeader(buf)
		require.NoError(t, err)
		require.Equal(t, b.Key, h.Key)
		require.Equal(t, b.Parent, h.Parent)
		require.Equal(t, ns, h.NS)
		require.Equal(t, fp, h.Fingerprint)
		data, err := tier.Check(buf, fp, ns, b.Key, 1000)
		require.NoError(t, err)
		require.Equal(t, b.Data, data)
	}
}

// Every single flipped bit, and every truncation, is caught: a stored block is served only
// intact.
func TestCheckCatchesEveryFlippedBitAndTear(t *testing.T) {
	fp := tier.Fingerprint{9}
	ns := prefix.Namespace{Adapter: 2, Salt: "abc"}
	b := block(ns, 256)
	buf, err := tier.Encode(nil, fp, b)
	require.NoError(t, err)
	for i := range len(buf) * 8 {
		bad := append([]byte(nil), buf...)
		bad[i/8] ^= 1 << (i % 8)
		_, err := tier.Check(bad, fp, ns, b.Key, 256)
		require.Error(t, err, "bit %d", i)
	}
	for n := range len(buf) {
		_, err := tier.Check(buf[:n], fp, ns, b.Key, 256)
		require.ErrorIs(t, err, tier.ErrCorrupt, "torn at %d", n)
	}
}

func TestCheckRefusesAnotherModelNamespaceOrKey(t *testing.T) {
	fp := tier.Fingerprint{1}
	ns := prefix.Namespace{Salt: "a"}
	b := block(ns, 64)
	buf, err := tier.Encode(nil, fp, b)
	require.NoError(t, err)
	_, err = tier.Check(buf, tier.Fingerprint{2}, ns, b.Key, 64)
	require.ErrorIs(t, err, tier.ErrMismatch)
	_, err = tier.Check(buf, fp, prefix.Namespace{Salt: "b"}, b.Key, 64)
	require.ErrorIs(t, err, tier.ErrMismatch)
	_, err = tier.Check(buf, fp, ns, prefix.Key{1}, 64)
	require.ErrorIs(t, err, tier.ErrMismatch)
	_, err = tier.Check(buf, fp, ns, b.Key, 65)
	require.ErrorIs(t, err, tier.ErrCorrupt)
	_, err = tier.Encode(nil, fp, tier.Block{NS: prefix.Namespace{Salt: string(make([]byte, tier.MaxSalt+1))}})
	require.ErrorIs(t, err, tier.ErrInvalidArgument)
}

// A stored block shorter than its own header, whose length field reads -1 as a uint64 and whose
// checksum matches, is corrupt; a negative dataLen is an invalid argument. Neither panics.
func TestCheckRefusesAHeaderLongerThanTheBuffer(t *testing.T) {
	fp := tier.Fingerprint{3}
	ns := prefix.Namespace{Salt: "a"} // a header of 136 bytes
	b := block(ns, 0)
	buf, err := tier.Encode(nil, fp, b)
	require.NoError(t, err)
	require.Len(t, buf, 136)
	buf = buf[:135] // the salt's padding cut short
	binary.LittleEndian.PutUint64(buf[112:], math.MaxUint64)
	binary.LittleEndian.PutUint32(buf[124:], 0)
	binary.LittleEndian.PutUint32(buf[124:], crc32.Checksum(buf, crc32.MakeTable(crc32.Castagnoli)))
	for _, n := range []int{-1, 0} {
		data, err := tier.Check(buf, fp, ns, b.Key, n)
		require.ErrorIs(t, err, tier.ErrCorrupt, "dataLen %d", n)
		require.Nil(t, data)
	}
	_, err = tier.Check(buf, fp, ns, b.Key, -1)
	var ce *tier.CorruptError
	require.ErrorAs(t, err, &ce)
	require.Equal(t, b.Key, ce.Key)
}
