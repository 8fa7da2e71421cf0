// Package tierbench measures the storage tiers (packages tier/disk and tier/redis) for the
// bench program and tier/disk's benchmarks: a store's Put and Get throughput against a
// yardstick measured in the same run, in alternating rounds.
//
// The disk's yardstick is a sequential write or read of the same padded records into one
// preallocated file, with the store's flags (O_DIRECT in ModeDirect). The Redis yardstick is
// pipelined raw SETs and GETs of values of the encoded blocks' length, through the store's own
// client, its SETs over as many pipelines at once as the store's Put.
package tierbench

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier"
	"github.com/pagedkv/pagedkv/tier/disk"
	"github.com/pagedkv/pagedkv/tier/redis"
)

// Batch is how many blocks one call moves: the kvcache manager's Puts carry 16.
const Batch = 16

// roundBytes is about how many bytes one round moves each way: enough batches of small blocks
// that a round takes milliseconds, not microseconds.
const roundBytes = 32 << 20

// Figure is one operation's throughput against its yardstick.
type Figure struct {
	StoreGBps float64 // median over rounds of the store's GB/s (1e9 bytes of block data)
	YardGBps  float64 // median over rounds of the yardstick's GB/s, the same bytes
	Ratio     float64 // median over rounds of store / yardstick in the same round
	Mode      string  // the disk store's I/O mode, or how many pipelines Redis's calls use
}

// Blocks returns a batch of blocks of n bytes in namespace ns whose keys count from first.
func Blocks(ns prefix.Namespace, n, first int) []tier.Block {
	data := make([]byte, n)
	for i := range data {
		data[i] = byte(i * 7)
	}
	bs := make([]tier.Block, Batch)
	for i := range bs {
		bs[i].NS, bs[i].Data = ns, data
	}
	Renumber(bs, first)
	return bs
}

// Renumber gives the blocks keys counting from first.
func Renumber(bs []tier.Block, first int) {
	for i := range bs {
		k := uint64(first + i)
		for j := range 8 {
			bs[i].Key[j] = byte(k >> (8 * j))
		}
	}
}

func keysOf(bs []tier.Block) []prefix.Key {
	ks := make([]prefix.Key, len(bs))
	for i, b := range bs {
		ks[i] = b.Key
	}
	return ks
}

func buffers(n int) [][]byte {
	dst := make([][]byte, Batch)
	for i := range dst {
		dst[i] = make([]byte, n)
	}
	return dst
}

// batchesPerRound is how many batches of blocks of n bytes one round moves.
func batchesPerRound(n int) int { return max(1, roundBytes/(Batch*n)) }

// pair times store and yardstick rounds, alternating which goes first, and returns the
// figure for rounds of bytes each.
func pair(rounds int, bytes int, store, yard func() error) (Figure, error) {
	var s, y, r []float64
	for i := range rounds {
		first, second := store, yard
		if i%2 == 1 {
			first, second = yard, store
		}
		d1, err := timed(first)
		if err != nil {
			return Figure{}, err
		}
		d2, err := timed(second)
		if err != nil {
			return Figure{}, err
		}
		if i%2 == 1 {
			d1, d2 = d2, d1
		}
		gs, gy := float64(bytes)/d1.Seconds()/1e9, float64(bytes)/d2.Seconds()/1e9
		s, y, r = append(s, gs), append(y, gy), append(r, gs/gy)
	}
	return Figure{StoreGBps: median(s), YardGBps: median(y), Ratio: median(r)}, nil
}

func timed(f func() error) (time.Duration, error) {
	start := time.Now()
	err := f()
	return time.Since(start), err
}

func median(v []float64) float64 {
	slices.Sort(v)
	if len(v) == 0 {
		return 0
	}
	return v[len(v)/2]
}

// repeat calls f n times and returns its first error.
func repeat(n int, f func(i int) error) func() error {
	return func() error {
		for i := range n {
			if err := f(i); err != nil {
				return err
			}
		}
		return nil
	}
}

// Disk measures a disk.Store in dir (which it fills and leaves to the caller to delete) with
// blocks of blockBytes: Put of new blocks, each round evicting as many old ones (whole
// segments), and Get of one batch, each against the yardstick over rounds.
func Disk(dir string, blockBytes, rounds int) (put, get Figure, err error) {
	ctx := context.Background()
	per := batchesPerRound(blockBytes)
	rec := RecordSize(blockBytes)
	s, err := disk.Open(dir+"/store", disk.Options{BlockBytes: blockBytes, LimitBytes: uint64(4 * per * Batch * rec), SpareBytes: uint64(per * Batch * rec)})
	if err != nil {
		return put, get, err
	}
	defer s.Close()
	mode := s.DiskStats().Mode
	f, err := NewSeqFile(dir+"/seq", rec, per, mode == disk.ModeDirect)
	if err != nil {
		return put, get, err
	}
	defer f.Close()
	bs := Blocks(prefix.Namespace{}, blockBytes, 0)
	next := 0
	storePut := repeat(per, func(int) error {
		Renumber(bs, next)
		next += Batch
		return s.Put(ctx, bs)
	})
	// Fill the store to its limit first: the rounds measure the steady state, evicting as they go.
	for range 5 {
		if err := storePut(); err != nil {
			return put, get, err
		}
	}
	bytes := per * Batch * blockBytes
	if put, err = pair(rounds, bytes, storePut, repeat(per, func(int) error { return f.Write() })); err != nil {
		return put, get, fmt.Errorf("put: %w", err)
	}
	keys, dst := keysOf(bs), buffers(blockBytes)
	storeGet := repeat(per, func(int) error {
		n, err := s.Get(ctx, prefix.Namespace{}, keys, dst)
		if err == nil && n != Batch {
			err = fmt.Errorf("got %d of %d blocks", n, Batch)
		}
		return err
	})
	if get, err = pair(rounds, bytes, storeGet, repeat(per, func(int) error { return f.Read() })); err != nil {
		return put, get, fmt.Errorf("get: %w", err)
	}
	put.Mode, get.Mode = mode.String(), mode.String()
	return put, get, nil
}

// RecordSize is the bytes of a disk store's file of a block of blockBytes in the zero
// namespace: header and data, padded to 4096 bytes.
func RecordSize(blockBytes int) int {
	return (tier.HeaderSize(prefix.Namespace{}) + blockBytes + 4095) &^ 4095
}

// SeqFile is the disk yardstick: one file of batches of Batch records of one size, written in
// place one batch after the other, one call per record, from one aligned buffer, so that a
// round of Writes writes as many distinct bytes in sequence as the store's Puts do (a Put
// appends at the end of a log and never writes the same place twice in a round). NewSeqFile
// writes it once, so its blocks are allocated before anything is timed. The caller closes it.
type SeqFile struct {
	fd      int
	rec     int
	batches int // the file holds batches * Batch records
	next    int // the batch the next Write writes
	direct  bool
	buf     []byte
}

// NewSeqFile creates the file at path with batches batches of Batch records of rec bytes (a
// multiple of 4096), with O_DIRECT where direct, and writes it once.
func NewSeqFile(path string, rec, batches int, direct bool) (*SeqFile, error) {
	flags := unix.O_RDWR | unix.O_CREAT | unix.O_TRUNC | unix.O_CLOEXEC
	if direct {
		flags |= unix.O_DIRECT
	}
	fd, err := unix.Open(path, flags, 0o644)
	if err != nil {
		return nil, fmt.Errorf("tierbench: open %s: %w", path, err)
	}
	raw := make([]byte, rec+4096)
	off := int(uintptr(unsafe.Pointer(&raw[0])) & 4095)
	if off != 0 {
		off = 4096 - off
	}
	f := &SeqFile{fd: fd, rec: rec, batches: max(1, batches), direct: direct, buf: raw[off : off+rec]}
	for range f.batches {
		if err := f.Write(); err != nil {
			f.Close()
			return nil, err
		}
	}
	return f, nil
}

// Write writes the next batch of Batch records over the file's, after the batch the last Write
// wrote (the first after the last): the fastest sequential write the filesystem offers, with
// no block allocated or freed. Without O_DIRECT it then syncs the data and drops the pages, as
// the store's ModeBuffered does.
func (f *SeqFile) Write() error {
	base := int64(f.next) * Batch * int64(f.rec)
	f.next = (f.next + 1) % f.batches
	for i := range Batch {
		if _, err := unix.Pwrite(f.fd, f.buf, base+int64(i*f.rec)); err != nil {
			return fmt.Errorf("tierbench: write: %w", err)
		}
	}
	if f.direct {
		return nil
	}
	if err := unix.Fdatasync(f.fd); err != nil {
		return fmt.Errorf("tierbench: fdatasync: %w", err)
	}
	return unix.Fadvise(f.fd, 0, 0, unix.FADV_DONTNEED)
}

// Read reads the first batch's Batch records, as the store's Get of one batch reads the same
// blocks each time; without O_DIRECT it then drops the pages.
func (f *SeqFile) Read() error {
	for i := range Batch {
		if _, err := unix.Pread(f.fd, f.buf, int64(i*f.rec)); err != nil {
			return fmt.Errorf("tierbench: read: %w", err)
		}
	}
	if f.direct {
		return nil
	}
	return unix.Fadvise(f.fd, 0, 0, unix.FADV_DONTNEED)
}

// Close closes the file; it stays on disk.
func (f *SeqFile) Close() error { return unix.Close(f.fd) }

// Redis measures s, a store of blocks of blockBytes: Put and Get of one batch against the
// yardstick through s's own client, pipelined raw SETs and GETs of the same bytes (each block
// as the store encodes it: a value of its own, not one buffer sent again), under keys of their
// own. The SETs go over as many pipelines at once as the store's Put (Store.Pipelines), which
// each figure's Mode names.
func Redis(s *redis.Store, blockBytes, rounds int) (put, get Figure, err error) {
	ctx := context.Background()
	per := batchesPerRound(blockBytes)
	ns := prefix.Namespace{Salt: "tierbench"}
	bs := Blocks(ns, blockBytes, 0)
	keys, dst := keysOf(bs), buffers(blockBytes)
	c := s.Client()
	raw := make([]string, Batch)
	values := make([][]byte, Batch)
	for i := range raw {
		raw[i] = "pagedkv:tierbench:raw:" + strconv.Itoa(i)
		if values[i], err = tier.Encode(nil, tier.Fingerprint{}, bs[i]); err != nil {
			return put, get, err
		}
	}
	// The yardstick spreads its SETs over as many pipelines, on as many goroutines, as the
	// store spreads a Put of the batch (Store.Pipelines): the same client, used the same way.
	parts := s.Pipelines(Batch*len(values[0]), Batch)
	setRun := func(from, to int) error {
		pipe := c.Pipeline()
		for i := from; i < to; i++ {
			pipe.Set(ctx, raw[i], values[i], 0)
		}
		_, err := pipe.Exec(ctx)
		return err
	}
	errs := make(chan error, parts)
	rawSet := func(int) error {
		for p := 1; p < parts; p++ {
			go func() { errs <- setRun(p*Batch/parts, (p+1)*Batch/parts) }()
		}
		err := setRun(0, Batch/parts)
		for range parts - 1 {
			err = errors.Join(err, <-errs)
		}
		return err
	}
	rawGet := func(int) error {
		pipe := c.Pipeline()
		for _, k := range raw {
			pipe.Get(ctx, k)
		}
		cmds, err := pipe.Exec(ctx)
		for _, cmd := range cmds {
			if v, _ := cmd.(interface{ Val() string }); v != nil && len(v.Val()) != len(values[0]) {
				return fmt.Errorf("raw get: %d bytes, want %d", len(v.Val()), len(values[0]))
			}
		}
		return err
	}
	storePut := repeat(per, func(int) error { return s.Put(ctx, bs) })
	storeGet := repeat(per, func(int) error {
		n, err := s.Get(ctx, ns, keys, dst)
		if err == nil && n != Batch {
			err = fmt.Errorf("got %d of %d blocks", n, Batch)
		}
		return err
	})
	if err := storePut(); err != nil {
		return put, get, err
	}
	if err := rawSet(0); err != nil {
		return put, get, err
	}
	bytes := per * Batch * blockBytes
	if put, err = pair(rounds, bytes, storePut, repeat(per, rawSet)); err != nil {
		return put, get, fmt.Errorf("put: %w", err)
	}
	if get, err = pair(rounds, bytes, storeGet, repeat(per, rawGet)); err != nil {
		return put, get, fmt.Errorf("get: %w", err)
	}
	put.Mode, get.Mode = pipelines(parts), pipelines(1)
	return put, get, nil
}

// pipelines names a Redis figure's connections at once.
func pipelines(n int) string {
	if n == 1 {
		return "1 pipeline"
	}
	return strconv.Itoa(n) + " pipelines"
}
