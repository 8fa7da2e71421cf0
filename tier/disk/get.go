package disk

import (
	"context"
	"fmt"

	"github.com/pagedkv/pagedkv/prefix"
	"github.com/pagedkv/pagedkv/tier"
)

// Get copies the blocks of the leading run of keys the store holds in namespace ns into dst and
// returns how many it copied. Each file is read whole and checked (tier.Check) before its bytes
// are copied: a block that fails is deleted, counted in Stats.Corrupt and ends the run. dst must
// hold at least len(keys) slices of exactly Options.BlockBytes; the store keeps none of them.
func (s *Store) Get(ctx context.Context, ns prefix.Namespace, keys []prefix.Key, dst [][]byte) (int, error) {
	if err := s.checkGet(ctx, keys, dst); err != nil {
		return 0, fmt.Errorf("disk: get: %w", err)
	}
	if err := s.enter(); err != nil {
		return 0, fmt.Errorf("disk: get: %w", err)
	}
	defer s.calls.Done()
	if len(keys) == 0 {
		return 0, nil
	}
	buf := s.getBuf(recordSize(ns, s.blockBytes))
	defer s.putBuf(buf)
	for i, k := range keys {
		if err := ctxErr(ctx); err != nil {
			return i, s.failed(fmt.Errorf("disk: get: %w", err))
		}
		ok, err := s.getOne(ns, k, *buf, dst[i])
		if err != nil {
			return i, s.failed(fmt.Errorf("disk: get: %w", err))
		}
		if !ok {
			return i, nil
		}
	}
	return len(keys), nil
}

// checkGet validates a Get's arguments; it changes nothing.
func (s *Store) checkGet(ctx context.Context, keys []prefix.Key, dst [][]byte) error {
	if ctx == nil {
		return errNilContext
	}
	if len(dst) < len(keys) {
		return &OptionError{Option: "len(dst)", Value: int64(len(dst)), Min: int64(len(keys)), Reason: fmt.Sprintf("%d slices for %d keys", len(dst), len(keys))}
	}
	for i := range keys {
		if len(dst[i]) != s.blockBytes {
			return &SizeError{What: "dst", Index: i, Len: len(dst[i]), Want: s.blockBytes}
		}
	}
	return nil
}

// getOne reads, checks and copies one block. It reports false for a miss: a key the store does
// not hold, a file gone, a block that failed its checks.
//
// The file is read outside mu. That is safe because a file under a block's final name is
// always whole: an eviction deletes it (an open file stays readable, a later open fails with
// ENOENT) and a later Put of the key renames a new whole file there.
func (s *Store) getOne(ns prefix.Namespace, k prefix.Key, buf, dst []byte) (bool, error) {
	s.mu.Lock()
	e := s.index[ikey{ns, k}]
	if e == nil || e.pending {
		s.st.Misses++
		s.mu.Unlock()
		return false, nil
	}
	s.order.touch(e)
	path, gen, size := e.path, e.gen, int(e.size)
	s.mu.Unlock()

	n, err := s.io.read(path, buf[:size])
	if isNotExist(err) {
		s.lost(ns, k, gen, false)
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("%w: %w", tier.ErrUnavailable, err)
	}
	data, err := tier.Check(buf[:min(n, tier.HeaderSize(ns)+s.blockBytes)], s.fp, ns, k, s.blockBytes)
	if err != nil {
		s.lost(ns, k, gen, true)
		return false, nil
	}
	copy(dst, data)
	s.mu.Lock()
	s.st.Gets++
	s.st.GetBytes += uint64(len(data))
	s.mu.Unlock()
	return true, nil
}

// lost forgets the block a Get found gone or corrupt, if the index still holds that same block
// (not one a later Put stored under the key), and counts a miss or a corrupt block.
func (s *Store) lost(ns prefix.Namespace, k prefix.Key, gen uint64, corrupt bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if corrupt {
		s.st.Corrupt++
	} else {
		s.st.Misses++
	}
	if e := s.index[ikey{ns, k}]; e != nil && e.gen == gen {
		s.removeLocked(e)
	}
}
