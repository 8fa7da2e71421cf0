package disk

import (
	"cmp"
	"context"
	"fmt"
	"sync"

	"github.com/pagedkv/pagedkv/tier"
)

// putTx is one Put in flight: the blocks it writes, each reserved in the index as a pending
// entry, and how far its files got. The store holds no half-done Put; commit or rollback ends
// it.
type putTx struct {
	s      *Store
	blocks []tier.Block
	items  []putItem
}

type putItem struct {
	b       int    // index into blocks
	e       *entry // its pending entry, whose path is the file's final name
	spare   string // the spare file it overwrites, or "" for a new file
	renamed bool   // its file is under its final name
}

// Put stores blocks, each in its own file, skipping those the store holds or another Put is
// writing. It writes every block over a spare file or into a new temporary file, up to
// ioWorkers at once, then renames them all to the blocks' names, then commits them to the index
// and evicts the least recently used blocks over the limit. A failure (an I/O error, ctx done)
// gives back the spare files it took, under their names, deletes the files it made and leaves
// the index as it was. The caller keeps blocks; the store copies their bytes.
func (s *Store) Put(ctx context.Context, blocks []tier.Block) error {
	if err := s.checkPut(ctx, blocks); err != nil {
		return fmt.Errorf("disk: put: %w", err)
	}
	if err := s.enter(); err != nil {
		return fmt.Errorf("disk: put: %w", err)
	}
	defer s.calls.Done()
	tx := s.reserve(blocks)
	if len(tx.items) == 0 {
		return nil
	}
	if err := tx.write(ctx); err != nil {
		tx.rollback()
		return s.failed(fmt.Errorf("disk: put: %w", err))
	}
	tx.commit()
	s.reap()
	return nil
}

// checkPut validates a Put's arguments; it changes nothing.
func (s *Store) checkPut(ctx context.Context, blocks []tier.Block) error {
	if !s.made() {
		return errNotMade
	}
	if ctx == nil {
		return errNilContext
	}
	var need uint64
	for i, b := range blocks {
		if len(b.Data) != s.blockBytes {
			return &SizeError{What: "block", Index: i, Len: len(b.Data), Want: s.blockBytes}
		}
		if len(b.NS.Salt) > tier.MaxSalt {
			return &ArgumentError{Name: "salt length", Value: int64(len(b.NS.Salt)), Min: 0, Max: tier.MaxSalt}
		}
		need += uint64(recordSize(b.NS, s.blockBytes))
	}
	if room := s.limit - s.spareTarget; need > room {
		return &FitError{Blocks: len(blocks), Need: need, Limit: room}
	}
	return nil
}

// reserve enters a pending entry for every block that is neither held nor being written, and
// marks the held ones recently used.
func (s *Store) reserve(blocks []tier.Block) *putTx {
	tx := &putTx{s: s, blocks: blocks}
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, b := range blocks {
		k := ikey{b.NS, b.Key}
		if e := s.index[k]; e != nil {
			if !e.pending {
				s.order.touch(e)
			}
			continue
		}
		e := &entry{k: k, path: s.blockPath(b.NS, b.Key), size: uint64(recordSize(b.NS, s.blockBytes)), pending: true}
		s.index[k] = e
		tx.items = append(tx.items, putItem{b: i, e: e, spare: s.takeSpareLocked(e.size)})
	}
	return tx
}

// write makes every item's file under a name that is not a block's, then renames them all to
// their blocks' names.
func (tx *putTx) write(ctx context.Context) error {
	if err := tx.each(func(it *putItem) error { return tx.writeOne(ctx, it) }); err != nil {
		return err
	}
	return tx.each(func(it *putItem) error {
		if err := tx.s.io.rename(it.from(), it.e.path); err != nil {
			return ioError(err)
		}
		it.renamed = true
		return nil
	})
}

// each calls f for every item, up to ioWorkers at once, and returns the first error. After an
// error it starts no more calls.
func (tx *putTx) each(f func(*putItem) error) error {
	var mu sync.Mutex
	var first error
	parallel(len(tx.items), func(i int) {
		mu.Lock()
		stop := first != nil
		mu.Unlock()
		if stop {
			return
		}
		if err := f(&tx.items[i]); err != nil {
			mu.Lock()
			first = cmp.Or(first, err)
			mu.Unlock()
		}
	})
	return first
}

// writeOne encodes one block into an aligned buffer, pads it and writes it: over a spare file,
// in place, or into a new file under the temporary name. Neither is a block's final name, so a
// crash leaves no half block under one.
func (tx *putTx) writeOne(ctx context.Context, it *putItem) error {
	if err := ctxErr(ctx); err != nil {
		return err
	}
	s := tx.s
	buf := s.getBuf(int(it.e.size))
	defer s.putBuf(buf)
	rec := (*buf)[:it.e.size]
	enc, err := tier.Encode(rec[:0], s.fp, tx.blocks[it.b])
	if err != nil {
		return err // checkPut has bounded the salt: not reached
	}
	clear(rec[len(enc):])
	if err := s.io.write(it.from(), rec, it.spare != ""); err != nil {
		return ioError(err)
	}
	return nil
}

// from returns where the item's file is written before it is renamed to its final name.
func (it *putItem) from() string {
	if it.spare != "" {
		return it.spare
	}
	return it.e.path + tmpSuffix
}

// rollback returns the Put's spare files to the pool under their old names, deletes the new
// files it made and forgets its pending entries.
func (tx *putTx) rollback() {
	s := tx.s
	var back []spare
	for _, it := range tx.items {
		cur := it.from()
		if it.renamed {
			cur = it.e.path
		}
		switch {
		case it.spare == "":
			_ = s.io.remove(cur) // a leftover is found by the next Open
		case !it.renamed || s.io.rename(cur, it.spare) == nil:
			back = append(back, spare{it.spare, it.e.size})
		default:
			_ = s.io.remove(cur)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, it := range tx.items {
		delete(s.index, it.e.k)
	}
	for _, sp := range back {
		s.addSpareLocked(sp.path, sp.size)
	}
}

// commit makes the Put's blocks visible, most recently used, then evicts over the limit.
func (tx *putTx) commit() {
	s := tx.s
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, it := range tx.items {
		it.e.pending = false
		s.order.pushFront(it.e)
		s.st.Blocks++
		s.st.Bytes += it.e.size
		s.st.Puts++
		s.st.PutBytes += uint64(s.blockBytes)
	}
	s.settleSpaceLocked()
}

// getBuf returns an aligned buffer of at least n bytes from the store's pool.
func (s *Store) getBuf(n int) *[]byte {
	if p, ok := s.bufs.Get().(*[]byte); ok {
		if cap(*p) >= n {
			*p = (*p)[:cap(*p)]
			return p
		}
	}
	b := alignedBuf(n)
	return &b
}

func (s *Store) putBuf(p *[]byte) { s.bufs.Put(p) }
