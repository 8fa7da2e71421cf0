// Package ledger is a physical-memory budget shared by several processes on one machine and
// GPU: a small file (under /dev/shm, say) that every process's managers join, holding the limit
// and each member's mapped bytes. No daemon runs; each process maps the file and takes turns
// through a file lock.
//
// # Layout and locks
//
// The file is a header (magic, version, limit, the device's total bytes for limits in percent)
// and 64 member slots (name, pid, mapped bytes, the usage the member last published, a request
// mailbox). Three kinds of open-file-description locks (fcntl F_OFD_SETLK, which the kernel drops
// when the holder dies) guard it:
//
//   - byte 0, the ledger lock: held for a few microseconds while a page is acquired (the sum of
//     all members' mapped bytes checked against the limit, then the member's own count raised)
//     and while members join, leave or are reaped.
//   - one liveness byte per slot, held by its member from Join to Leave on a descriptor of its
//     own. A slot marked live whose liveness byte nobody holds belongs to a process that died
//     (kill -9 included): whoever next needs memory, lists the members or joins "reaps" it and its
//     bytes return to the limit. Lock ownership is chosen over pid liveness because it is immune
//     to pid reuse and to pid namespaces (containers), and over leases because it needs no clock
//     and no heartbeat.
//   - one request byte per slot, held by whoever is talking to that member's mailbox.
//
// The driver frees a dead process's GPU memory when it tears the process down; the liveness lock
// is dropped in the same teardown, so for a moment the ledger may count bytes the device has not
// yet freed. A page map that then fails in the driver releases its bytes and fails as usual.
//
// # Asking other processes for memory
//
// A member that needs a page when the limit is spent reaps dead members, then asks the others,
// largest first, through their mailboxes: a request word (a futex the member's responder
// goroutine sleeps on) carries "give back N bytes", "and compact if you allow it", or "drop your
// prefix cache"; the answer comes back through an acknowledgement word. Members in the same
// process are asked directly. A member asked while it is busy in its own operation answers
// with what it could give at once, so two processes short of memory at the same moment never
// wait on each other for long.
//
// # A file cut short
//
// Any process that may write the file may also truncate it, and reading the mapping past the
// file's new end raises SIGBUS, which would kill the process. Every call and both member
// goroutines read the mapping under debug.SetPanicOnFault and recover such a fault: the call
// fails with a *FaultError (ErrDamaged) naming the file's size, and the goroutines end. The
// handle stays damaged. Close it, and open the file again once it is whole (an empty file is
// made a new ledger by an Open with a limit).
//
// # Concurrency and ownership
//
// A *Ledger is safe for concurrent use; it owns the file mapping and descriptors until Close.
// A *Member belongs to the Ledger it joined; Leave releases its slot. Holders (the managers)
// are called from the member's two goroutines (one answers requests, one publishes Usage every
// half second) and must be safe for concurrent use.
package ledger
