// Package disk is a tier.Store over a local directory: cached KV blocks below the host tier,
// one file per block, bounded in bytes, kept across restarts.
//
// # Layout
//
// A store's directory holds a lock file, LOCK, a directory of spare files, spare, and 256
// fan-out directories named by the first byte of a block's key in lower-case hex ("00" to
// "ff"). Each block is one file in the directory of its key:
//
//	<dir>/<key[0] hex>/<namespace hash>-<key hex>
//
// where the namespace hash is the first 8 bytes, in hex, of SHA-256 over the namespace's
// adapter (8 bytes, little-endian) and its salt. The file holds the block as tier.Encode lays
// it out (the self-describing header, then the data), zero-padded to a multiple of 4096 bytes.
// A reader parses the header (tier.ParseHeader), takes header size plus data length bytes and
// checks them (tier.Check); the padding after them carries nothing. The file's size is exactly
// the padded record, so a shorter file is a torn write.
//
// Files in spare (named by decimal sequence numbers) hold no block: they are the files of
// removed blocks, kept so that a later Put overwrites them in place instead of making a new
// file and deleting an old one (Options.SpareBytes). Their bytes mean nothing.
//
// A Put writes each block into a spare file, or a new file named as the block plus ".tmp", and
// then renames it to the block's name: a block's name never holds half a file. Open deletes
// every leftover ".tmp" file. It reads every block file's header and keeps those of its own
// fingerprint and block size whose size and name agree with their header; it deletes the
// others (counted in DiskStats.DroppedAtOpen) and leaves alone files whose names do not have
// the block form. Data checksums are checked on every Get.
//
// # I/O
//
// Files are written and read with O_DIRECT from buffers aligned to 4096 bytes, so cached blocks
// do not crowd the page cache. Where the filesystem refuses O_DIRECT, a store opened with
// ModeAuto writes through the page cache, calls fdatasync and drops the pages with
// posix_fadvise(DONTNEED); DiskStats.Mode says which mode is in use. A direct write is not
// followed by fdatasync: a block lost in a crash is a miss, and a torn one fails its checks.
// A call reads or writes up to 4 files at once.
//
// # Bound and eviction
//
// The index in memory keeps the blocks in least-recently-used order; Put, Get and Has mark
// the blocks they touch. Options.LimitBytes bounds the files' bytes, headers and padding
// included: the blocks' (Stats.Bytes) and the spare files' (DiskStats.SpareBytes) together.
// Blocks may fill LimitBytes less SpareBytes. A Put commits its blocks, then evicts the least
// recently used blocks (their files become spares) until the blocks fit, then deletes spare
// files until the spares fit in SpareBytes and everything in LimitBytes. Files a Put is still
// writing are not counted, so the disk may briefly hold the limit plus the Puts in flight. A
// Put that could never fit returns a *FitError.
//
// # Faults
//
// A dir that is a file, or lies under one, is an *ArgumentError at Open. Every other failure of
// the filesystem matches tier.ErrUnavailable and keeps its errno in the chain. A full disk or
// quota (ENOSPC, EDQUOT) matches ErrNoSpace as well. A read-only mount or a directory without
// write permission (EROFS, EACCES, EPERM) matches ErrReadOnly as well: at Open, which creates
// LOCK and probes O_DIRECT, or later at a Put. A failed call is counted in Stats.Failures and
// leaves the index and the block files as they were.
//
// # Concurrency
//
// A Store is safe for concurrent use. One mutex guards the index, the LRU order, the spare pool
// and the counters; files are written, read and deleted outside it, renamed under it. A Put
// reserves its keys in the index while it writes, so two Puts never write one file. A Get pins
// the blocks it reads: a pinned block removed meanwhile has its file deleted, never reused. Close
// waits for the calls in flight. One directory belongs to one open Store at a time (a flock on
// LOCK).
package disk
