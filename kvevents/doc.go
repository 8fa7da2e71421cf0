// Package kvevents publishes a manager's KV events in vLLM's wire format, so that the routers
// of a fleet (llm-d's indexer, NVIDIA Dynamo's KV router, SGLang's router, kthena, AIBrix) see
// which blocks every pagedkv replica holds, as they see vLLM's.
//
// A Publisher drains one prefix.Subscription (kvcache.Manager.Subscribe; each model of a shared
// pool is a Manager) on its own goroutine. The appending goroutines never wait for it: they
// queue events in the subscription, which drops them when the publisher falls behind, and the
// publisher sends such a loss as AllBlocksCleared, after which a router relearns the replica's
// blocks as they are stored again. The core packages do not import this one.
//
// The wire format is vLLM's (vllm/distributed/kv_events.py): a ZMQ PUB socket sends each batch
// as three frames, the topic "kv@<pod>@<model>", the sequence number (8 bytes big-endian, from
// 0) and the msgpack EventBatch [ts, events, data_parallel_rank]. An event is a map tagged
// "type" (or, with Encoding Arrays, vLLM's older array with the tag first):
//
//	BlockStored      block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
//	                 lora_name, and group_idx, kv_cache_spec_kind, kv_cache_spec_sliding_window
//	                 when the event has a group
//	BlockRemoved     block_hashes, medium, and group_idx when set
//	AllBlocksCleared nothing
//
// A block hash is the low 64 bits of its key read big-endian (Hash64), as a msgpack integer,
// as vLLM sends it by default, or its 32 bytes (RawHashes). parent_block_hash is null for a
// sequence's first block. lora_id is the namespace's adapter id (null for the base model) and
// lora_name its name from Config.LoRANames. medium is "GPU" for device blocks, "CPU" for the
// host prefix cache and a tier's Medium (kvcache.Tier: "DISK", "CLUSTER") for blocks written to
// a store below it, and removed when the store evicts them. AllBlocksCleared carries no medium on the wire, so clearing the host cache
// alone makes a router forget the replica's device blocks too: it then under-counts hits until
// it relearns them, and never routes on blocks that are gone.
//
// Replay: a ROUTER socket (ReplayEndpoint) keeps the newest batches (ReplayBuffer of them, of
// at most ReplayBytes). A client sends the start sequence number (8 bytes big-endian) behind
// an empty delimiter frame, from a DEALER socket (a REQ socket sends the same request but reads
// only the first answer), and gets every kept batch from that number on as [seq, payload],
// then the end marker -1 with an empty payload. A subscriber that sees a gap in the sequence
// numbers (a batch dropped at the PUB socket's HWM, or sent before it subscribed) asks for the
// missing range. A malformed request gets no answer: it is counted in Stats and handed to
// Config.OnError as a *RequestError, and the publisher goes on serving.
//
// The endpoint is bound or connected as vLLM decides: bound when it holds "*" or "::" or is
// ipc://, connected otherwise (inproc:// is refused, see Config.Endpoint). A bind that fails
// is an *EndpointError from Start; a connect endpoint is dialled in the background and
// redialled after a loss, as ZMQ does. A batch goes out a millisecond after its first event
// (EveryInterval), on every manager call that caches or evicts (EveryCall), or when the
// runtime calls Flush at the end of a step (EveryFlush).
//
// Block keys are the manager's (prefix.Key). A router that recomputes keys from token ids, as
// llm-d's does, keys them its own way and keeps these as opaque ids; one that compares them
// with vLLM's wants a manager that keys blocks as vLLM does (prefix.VLLMKeys), so that both kinds
// of replica share one key space.
//
// Sockets come from github.com/go-zeromq/zmq4, a ZMQ in pure Go (so the module still builds with
// CGO_ENABLED=0), which llm-d's indexer uses too. It trusts its peers, so the publisher's
// sockets reach theirs through guarded connections (guard.go): a peer that declares a frame
// longer than a subscription or a replay request can be, sends a malformed command, declares a
// socket type that cannot talk to the socket, does not finish its handshake within 5 s or stops
// reading for 10 s is cut off, and the others are served on. A peer that connects and says
// nothing still holds up the handshakes of later peers for those 5 s: go-zeromq shakes hands
// with one peer at a time.
//
// Concurrency: a Publisher is safe for concurrent use; its own goroutines send, serve replay
// and (for a connect endpoint) dial, and Close waits for them.
package kvevents
