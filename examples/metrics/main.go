// Command metrics serves a small chat workload's KV-cache figures on /metrics for Prometheus,
// on the host backend (no GPU needed): two models share one limit in a kvcache.SharedPool, or,
// with -ledger, a limit shared with other processes (watch them with pagedkvctl top). With
// -kv-events, each model also publishes its KV events in vLLM's wire format for a
// KV-cache-aware router (see package kvevents), one batch per engine step.
//
//	go run ./examples/metrics -addr :9400
//	go run ./examples/metrics -kv-events 'tcp://*:5557' # llama on 5557, qwen on 5558
//	go run ./examples/metrics -ledger /dev/shm/pagedkv -models llama &
//	go run ./examples/metrics -ledger /dev/shm/pagedkv -models qwen -addr :9401 &
//	go run ./cmd/pagedkvctl -ledger /dev/shm/pagedkv top
package main

import (
	"errors"
	"flag"
	"fmt"
	"log"
	"math/rand/v2"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/pagedkv/pagedkv/kvcache"
	"github.com/pagedkv/pagedkv/kvevents"
	"github.com/pagedkv/pagedkv/ledger"
	"github.com/pagedkv/pagedkv/metrics"
	"github.com/pagedkv/pagedkv/vmm"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:9400", "listen address for /metrics")
	ledgerPath := flag.String("ledger", "", "share the limit with other processes through this ledger file (created if missing)")
	models := flag.String("models", "llama,qwen", "comma-separated model names")
	limit := flag.Uint64("limit", 256<<20, "bytes all models may map (the ledger's, when it creates one)")
	duration := flag.Duration("for", 0, "stop after this long (0: run until killed)")
	kvEvents := flag.String("kv-events", "", "publish each model's KV events on this ZMQ endpoint, the port raised by the model's index (tcp://*:5557)")
	flag.Parse()
	host, _ := os.Hostname()
	s, err := newServer(options{models: strings.Split(*models, ","), limit: *limit, ledger: *ledgerPath, seed: uint64(os.Getpid()),
		kvEvents: *kvEvents, pod: host})
	if err != nil {
		log.Fatal(err)
	}
	defer s.close()
	go func() {
		for range time.Tick(5 * time.Millisecond) {
			if err := s.step(); err != nil {
				log.Fatal(err)
			}
		}
	}()
	srv := &http.Server{Addr: *addr, Handler: s.handler()}
	if *duration > 0 {
		time.AfterFunc(*duration, func() { srv.Close() })
	}
	fmt.Printf("serving %s on http://%s/metrics\n", *models, *addr)
	for _, md := range s.models {
		if md.pub != nil {
			fmt.Printf("%s: KV events on %s, topic %s\n", md.name, md.pub.Addr(), md.pub.Topic())
		}
	}
	if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Fatal(err)
	}
}

type options struct {
	models   []string
	limit    uint64
	ledger   string
	seed     uint64
	kvEvents string // endpoint of the first model's KV events ("": none)
	pod      string // the pod name in the events' topic
}

// server is the workload and its exporter.
type server struct {
	dev    vmm.Device
	led    *ledger.Ledger
	pool   *kvcache.SharedPool
	models []*model
	reg    *prometheus.Registry

	mu     sync.Mutex // one step at a time; close waits for the step under way
	closed bool
	rng    *rand.Rand
}

// model is one model's running requests.
type model struct {
	name string
	m    *kvcache.Manager
	pub  *kvevents.Publisher // nil without -kv-events
	live []kvcache.SeqID
	next kvcache.SeqID
}

// systemPrompts are shared prefixes: requests that start with one hit the prefix cache.
const systemPrompts, promptTokens = 4, 256

func newServer(o options) (s *server, err error) {
	s = &server{reg: prometheus.NewRegistry(), rng: rand.New(rand.NewPCG(o.seed, 1))}
	defer func() {
		if err != nil {
			s.close()
		}
	}()
	if s.dev, err = vmm.NewHostDevice(vmm.HostOptions{}); err != nil {
		return nil, err
	}
	cfg := kvcache.SharedConfig{Limit: o.limit, CompactOnPressure: true}
	if o.ledger != "" {
		if s.led, err = ledger.Open(o.ledger, ledger.Options{Limit: o.limit, DeviceBytes: s.dev.Info().TotalMemory}); err != nil {
			return nil, err
		}
		cfg.Ledger = s.led
	}
	if s.pool, err = kvcache.NewShared(s.dev, cfg); err != nil {
		return nil, err
	}
	col := metrics.NewCollector()
	if err := col.AddSharedPool("shared", s.pool); err != nil {
		return nil, err
	}
	if s.led != nil {
		if err := col.AddLedger("gpu0", s.led); err != nil {
			return nil, err
		}
	}
	for _, name := range o.models {
		m, err := s.pool.Register(name, kvcache.Config{Layers: 4, KVHeads: 2, HeadDim: 64, ElemSize: 2, BlockTokens: 16,
			PageSize: 2 << 20, Capacity: 1 << 30})
		if err != nil {
			return nil, err
		}
		md := &model{name: name, m: m}
		s.models = append(s.models, md)
		if o.kvEvents != "" {
			if md.pub, err = publish(m, o.kvEvents, len(s.models)-1, o.pod, name); err != nil {
				return nil, err
			}
		}
	}
	if err := s.reg.Register(col); err != nil {
		return nil, err
	}
	return s, nil
}

// publish starts the KV events publisher of model i, m, on endpoint with its port raised by i
// (an ephemeral port "*" stays one), batches sent at the end of each step.
func publish(m *kvcache.Manager, endpoint string, i int, pod, name string) (*kvevents.Publisher, error) {
	if j := strings.LastIndexByte(endpoint, ':'); i > 0 && j >= 0 {
		if port, err := strconv.Atoi(endpoint[j+1:]); err == nil {
			endpoint = endpoint[:j+1] + strconv.Itoa(port+i)
		}
	}
	sub, err := m.Subscribe(1 << 16)
	if err != nil {
		return nil, err
	}
	pub, err := kvevents.Start(sub, kvevents.Config{Endpoint: endpoint, Pod: pod, Model: name, Batching: kvevents.EveryFlush})
	if err != nil {
		sub.Close()
		return nil, err
	}
	return pub, nil
}

// step is one engine step for every model: maybe admit a request (its prompt starts with one of
// the system prompts), decode one token for each running request, finish some.
func (s *server) step() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	for _, md := range s.models {
		if s.rng.IntN(4) == 0 {
			sys := s.rng.IntN(systemPrompts)
			prompt := make([]kvcache.TokenID, promptTokens+s.rng.IntN(64))
			for i := range prompt {
				if i < promptTokens {
					prompt[i] = kvcache.TokenID(sys*promptTokens + i)
				} else {
					prompt[i] = kvcache.TokenID(s.rng.Uint32())
				}
			}
			seq := md.next
			md.next++
			cached, err := md.m.StartSequence(seq, kvcache.Prompt{Tokens: prompt})
			if err == nil {
				_, err = md.m.AppendTokenIDs(seq, prompt[cached:], nil)
			}
			switch {
			case err == nil:
				md.live = append(md.live, seq)
			case errors.Is(err, kvcache.ErrOutOfMemory): // not admitted this step
				md.m.FreeSequence(seq)
			default:
				return err
			}
		}
		for i := 0; i < len(md.live); i++ {
			seq := md.live[i]
			_, err := md.m.AppendTokens(seq, 1, nil)
			if err != nil && !errors.Is(err, kvcache.ErrOutOfMemory) {
				return err
			}
			if err != nil || s.rng.IntN(200) == 0 { // finished (or preempted by free when memory ran out)
				if err := md.m.FreeSequence(seq); err != nil {
					return err
				}
				md.live = append(md.live[:i], md.live[i+1:]...)
				i--
			}
		}
		if md.pub != nil { // the step's events, as one batch
			if err := md.pub.Flush(); err != nil {
				return err
			}
		}
	}
	return nil
}

// handler serves /metrics.
func (s *server) handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(s.reg, promhttp.HandlerOpts{}))
	return mux
}

func (s *server) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	for _, md := range s.models {
		if md.pub != nil {
			md.pub.Close()
		}
	}
	if s.pool != nil {
		s.pool.Close()
	}
	if s.led != nil {
		s.led.Close()
	}
	if s.dev != nil {
		s.dev.Close()
	}
}
