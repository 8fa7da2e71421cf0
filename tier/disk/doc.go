// Package disk is a tier.Store over a local directory: cached KV blocks below the host tier,
// appended to segment files, bounded in bytes, kept across restarts.
//
// # Layout
//
// A store's directory holds a lock file, LOCK, segment files named by a sequence number in 16
// lower-case hex digits, 0000000000000001.seg, 0000000000000002.seg, ..., and spare files
// named the same way with ".spare" (Options.SpareBytes). A higher number is a younger segment.
// Spare files hold no block: they are evicted segments' files, kept so that a new segment can
// overwrite one in place instead of allocating a file. Other files are not the store's and are
// left alone.
//
// A segment is a run of records with no gap and no file header, ended by the file's end or by a
// page of 4096 zero bytes at a record's start (a segment made from a spare file holds the spare's
// older bytes after it; the next append overwrites the zero page). Each record starts at an offset
// that is a multiple of 4096: the block as tier.Encode lays it out (the self-describing header,
// then the data), zero-padded to a multiple of 4096 bytes. A reader finds the records from offset
// 0: it parses the header there (tier.ParseHeader), and the record's length is header size plus the
// header's data length, rounded up to 4096; the next record starts after it. The padding carries
// nothing. A record whose header fingerprint is ff ff ff ff, then 26 zero bytes, then ff ff, was
// dropped (Drop overwrites the fingerprint in place): its length still leads to the next record,
// and it drops any earlier record of its namespace and key (a copy a Get moved, or a key twice in
// one Put), as a later record would replace it.
//
// A Put appends its records at the tail of the youngest segment. When the next record would take a
// segment past Options.SegmentBytes, a new segment starts (a record larger than that has a segment
// of its own). Records are never rewritten in place, except for the drop mark; a Get's second
// chance appends a copy. A later record of a namespace and key replaces an earlier one: the index
// maps each key to the last record of it.
//
// Open reads every segment, oldest first, and rebuilds the index (a warm restart). It drops and
// counts (DiskStats.DroppedAtOpen) the records of another fingerprint or block size. At a header
// that does not parse, or a record whose bytes run past the file's end (a torn append), it
// truncates the segment there (DiskStats.TornAtOpen): nothing after it can be found. At a zero page
// it truncates the segment too, counting nothing. A segment left with no record the index points at
// becomes a spare file or is deleted. Data checksums are checked on every Get.
//
// # I/O
//
// Segments are written and read with O_DIRECT from buffers aligned to 4096 bytes, so cached blocks
// do not crowd the page cache. Where the filesystem refuses O_DIRECT, a store opened with ModeAuto
// writes through the page cache, calls fdatasync and drops the pages with posix_fadvise(DONTNEED);
// DiskStats.Mode says which mode is in use. A direct write is not followed by fdatasync: a block
// lost in a crash is a miss, and a torn one fails its checks.
//
// Records move through stages: buffers the store maps apart from the Go heap and asks the kernel
// to back with huge pages (MADV_HUGEPAGE), because direct I/O to and from a few huge pages is much
// faster than to and from the many 4 KiB pages of a caller's buffers. A Put encodes its batch into
// the append stage and writes each segment's share of it: in one write where it holds less than
// 512 KiB; else it writes the first record while another goroutine encodes the others, then writes
// whatever is encoded each time a write returns, encoding the next record itself where none is
// ready. A Get reads records that lie one after the other with one call, up to 256 KiB (one record
// at least), into a ring of slots in a stage of about 2 MiB, while another goroutine checks each
// block read and copies it out. Only one goroutine of a call blocks in I/O at a time: on two CPUs,
// a third would hold the CPU the checksums need. A store keeps its append stage, as large as its
// largest run, and one stage per Get in flight at its busiest, until Close.
//
// # Bound and eviction
//
// Options.LimitBytes bounds the files' bytes: the segments' (Stats.Bytes, dead records
// included: those dropped, moved or replaced stay until their segment goes) and the spare
// files' (DiskStats.SpareBytes) together. DiskStats.LiveBytes counts the records the index
// points at. Segments may fill LimitBytes less SpareBytes. After a Put publishes its records,
// the store evicts the oldest segments, whole, and forgets every block in them
// (Stats.Evictions), until the segments fit; their files become spares while the spares fit in
// SpareBytes, and are deleted otherwise. Then it deletes the oldest spare files until
// everything fits in LimitBytes. A segment whose every record is dead goes the same way at
// once, unless it is the youngest. Records a Put is still writing are not counted, so the disk
// may briefly hold the limit plus one Put. A Put that could never fit in LimitBytes less
// SpareBytes returns a *FitError.
//
// The store reports the blocks it removes on its own, those of evicted segments and those a
// Get drops for failing their checks, through TakeEvictions (tier.EvictionReporter), from its
// first call on: up to EvictionQueue of them between two calls, the rest counted. A block
// stored again by the time TakeEvictions is called is not reported. Drop is the caller's own
// act and is not reported.
//
// The policy approximates least-recently-used order by segment, with a second chance: a Get
// that serves a block from a segment that eviction would reach within the next quarter of
// LimitBytes less SpareBytes of appends (its start, less the oldest segment's, plus the room
// left, is under that quarter; the youngest segment excepted) appends the record again at the
// tail, so that the eviction of its
// old segment spares it. A Put of a key the store holds is skipped and does not count as a
// use; nor does Has. Blocks read once from younger segments, and blocks never read, go with
// their segment in the order they were written.
//
// # Faults
//
// A dir that is a file, or lies under one, is an *ArgumentError at Open. Every other failure of
// the filesystem matches tier.ErrUnavailable and keeps its errno in the chain. A full disk or
// quota (ENOSPC, EDQUOT) matches ErrNoSpace as well. A read-only mount or a directory without
// write permission (EROFS, EACCES, EPERM) matches ErrReadOnly as well: at Open, which creates
// LOCK and probes O_DIRECT, or later at a Put. A failed call is counted in Stats.Failures and
// leaves the index as it was. A failed Put deletes the segments it started and truncates the
// tail back to its committed size, or, in a reused spare file, writes the zero page there again,
// so the next Put writes over any partial bytes and the next Open finds none of them. A failed
// drop mark is counted in Stats.Failures, and the block comes back at the next Open.
//
// # Concurrency
//
// A Store is safe for concurrent use. One mutex guards the index, the segments' sizes and
// their pins, and the counters. Appends (a Put, a Get's second chances) are serialized by a
// second lock, taken first: an append reserves its offsets at the tail under the mutex, writes
// outside it, then publishes the index entries under it, so a Get never sees a record whose
// bytes are not yet written. Reads happen outside both. A Get pins the segments it reads, and
// a segment evicted or emptied meanwhile is closed and deleted only after its last reader.
// Close waits for the calls in flight. One directory belongs to one open Store at a time (a
// flock on LOCK).
package disk
