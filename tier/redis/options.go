package redis

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strings"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/pagedkv/pagedkv/tier"
)

// DefaultTimeout is the deadline of one call when Options.Timeout is zero.
const DefaultTimeout = 50 * time.Millisecond

// maxBlockBytes bounds a block well below Redis's largest string (512 MiB, proto-max-bulk-len's
// default), leaving room for the header.
const maxBlockBytes = 256 << 20

// MaxPipelines bounds Options.Pipelines. PipelineBytes is about the least a Put writes on
// each connection: a batch of fewer bytes takes fewer pipelines (16 blocks of 16 KiB take one).
const (
	MaxPipelines  = 16
	PipelineBytes = 1 << 20
)

// maxModel bounds the model name that every key repeats.
const maxModel = 128

// Options configure a Store. It is plain data: Open validates it and keeps a copy.
type Options struct {
	// Addrs are the servers' host:port addresses: one for a single node, several for a Redis
	// Cluster (the client discovers the rest of the cluster from any of them). Give Addrs or
	// URL, not both.
	Addrs []string
	// URL names the server instead of Addrs: redis://[user:password@]host:port[/db], or
	// rediss:// for TLS. With Cluster, further nodes come as ?addr=host:port parameters and
	// the database is 0. Other query parameters are refused: Timeout governs the client.
	// Credentials go in the URL or in Username and Password, not in both.
	URL string
	// Cluster selects Redis Cluster even with a single address.
	Cluster bool
	// Username and Password authenticate to the servers (Redis ACL), where they require it.
	Username, Password string
	// Model names the model in every key: letters, digits and . _ - / only.
	Model string
	// Fingerprint is the model's block layout; blocks of another fingerprint are never served.
	Fingerprint tier.Fingerprint
	// BlockBytes is the size of one block's data.
	BlockBytes int
	// Timeout bounds each call, dialing included; 0 means DefaultTimeout. The caller's context
	// deadline applies too. A Put moves its whole batch within it, so a slow link or large
	// batches need more than the default.
	Timeout time.Duration
	// TTL expires stored blocks after this long; 0 keeps them until Redis evicts them.
	TTL time.Duration
	// Pipelines is how many connections a Put of a large batch (about PipelineBytes or more per
	// connection) spreads its blocks over, each a pipeline of its share, written at once: the
	// client encodes and writes each share on a core of its own. 0 means 2 where the process
	// has 4 or more Ps (GOMAXPROCS) and 1 otherwise; at most MaxPipelines. A single node only:
	// a cluster's client already writes to its nodes in parallel.
	Pipelines int
	// Evictions makes the store hear the server evict and expire its blocks, and report them
	// (TakeEvictions): it subscribes to the server's keyspace notifications and adds the flags
	// Exe to its notify-keyspace-events where they are missing (CONFIG SET, a setting of the
	// whole server). A single node only: a cluster's nodes notify their own subscribers.
	Evictions bool
}

// OptionError reports an invalid Options field; it matches ErrInvalidArgument.
type OptionError struct {
	Field  string
	Reason string
}

// Error describes the invalid field.
func (e *OptionError) Error() string {
	if e == nil {
		return "<nil>"
	}
	return fmt.Sprintf("invalid argument: option %s: %s", e.Field, e.Reason)
}

// Is reports whether target is ErrInvalidArgument.
func (e *OptionError) Is(target error) bool { return e != nil && target == ErrInvalidArgument }

// Validate checks the options and returns an *OptionError for the first invalid field.
func (o *Options) Validate() error {
	if o == nil {
		return &OptionError{Field: "Options", Reason: "nil"}
	}
	if _, err := o.endpoint(); err != nil {
		return err
	}
	for i, a := range o.Addrs {
		if a == "" || strings.ContainsAny(a, " \t\r\n") {
			return &OptionError{Field: fmt.Sprintf("Addrs[%d]", i), Reason: fmt.Sprintf("%q is not host:port", a)}
		}
	}
	if err := validModel(o.Model); err != nil {
		return err
	}
	if o.Fingerprint == (tier.Fingerprint{}) {
		return &OptionError{Field: "Fingerprint", Reason: "zero: derive it from the model's geometry"}
	}
	if o.BlockBytes <= 0 || o.BlockBytes > maxBlockBytes {
		return &OptionError{Field: "BlockBytes", Reason: fmt.Sprintf("%d is not in [1, %d]", o.BlockBytes, maxBlockBytes)}
	}
	if o.Timeout < 0 {
		return &OptionError{Field: "Timeout", Reason: fmt.Sprintf("%v is negative", o.Timeout)}
	}
	if o.Pipelines < 0 || o.Pipelines > MaxPipelines {
		return &OptionError{Field: "Pipelines", Reason: fmt.Sprintf("%d is not in [0, %d]", o.Pipelines, MaxPipelines)}
	}
	if o.Evictions && (o.Cluster || len(o.Addrs) > 1) {
		return &OptionError{Field: "Evictions", Reason: "a single node only: each node of a cluster notifies its own subscribers"}
	}
	if o.TTL < 0 || (o.TTL > 0 && o.TTL < time.Millisecond) {
		return &OptionError{Field: "TTL", Reason: fmt.Sprintf("%v is neither 0 nor at least 1ms", o.TTL)}
	}
	return nil
}

func validModel(m string) error {
	if m == "" || len(m) > maxModel {
		return &OptionError{Field: "Model", Reason: fmt.Sprintf("%d bytes, want 1 to %d", len(m), maxModel)}
	}
	for _, r := range m {
		ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("._-/", r)
		if !ok {
			// Braces would make a hash tag and colons would blur the key's fields.
			return &OptionError{Field: "Model", Reason: fmt.Sprintf("%q has %q: use letters, digits and . _ - /", m, r)}
		}
	}
	return nil
}

// endpoint is where and how the client connects: from Addrs, Username and Password, or from
// URL.
type endpoint struct {
	addrs              []string
	username, password string
	db                 int
	tls                *tls.Config
}

// endpoint returns the servers and credentials the options name, or an *OptionError.
func (o *Options) endpoint() (endpoint, error) {
	switch {
	case o.URL == "" && len(o.Addrs) == 0:
		return endpoint{}, &OptionError{Field: "Addrs", Reason: "empty: name at least one server, or give URL"}
	case o.URL == "":
		return endpoint{addrs: o.Addrs, username: o.Username, password: o.Password}, nil
	case len(o.Addrs) > 0:
		return endpoint{}, &OptionError{Field: "URL", Reason: "given with Addrs: name the servers one way"}
	}
	u, err := url.Parse(o.URL)
	if err != nil {
		// url.Error repeats the URL, password included: keep only the reason.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return endpoint{}, &OptionError{Field: "URL", Reason: "does not parse: " + err.Error()}
	}
	if u.Scheme != "redis" && u.Scheme != "rediss" {
		return endpoint{}, &OptionError{Field: "URL", Reason: fmt.Sprintf("scheme %q, want redis or rediss", u.Scheme)}
	}
	allowed := []string{"addr"}
	if !o.Cluster {
		allowed = []string{"db"}
	}
	for k := range u.Query() {
		if !slices.Contains(allowed, k) {
			return endpoint{}, &OptionError{Field: "URL", Reason: fmt.Sprintf("query parameter %q: only %s is taken", k, strings.Join(allowed, ", "))}
		}
	}
	if u.User != nil && (o.Username != "" || o.Password != "") {
		return endpoint{}, &OptionError{Field: "URL", Reason: "carries credentials and so do Username or Password: give them once"}
	}
	var e endpoint
	if o.Cluster {
		co, err := goredis.ParseClusterURL(o.URL)
		if err != nil {
			return endpoint{}, &OptionError{Field: "URL", Reason: "does not parse: " + err.Error()}
		}
		e = endpoint{addrs: co.Addrs, username: co.Username, password: co.Password, tls: co.TLSConfig}
	} else {
		so, err := goredis.ParseURL(o.URL)
		if err != nil {
			return endpoint{}, &OptionError{Field: "URL", Reason: "does not parse: " + err.Error()}
		}
		e = endpoint{addrs: []string{so.Addr}, username: so.Username, password: so.Password, db: so.DB, tls: so.TLSConfig}
	}
	if u.User == nil {
		e.username, e.password = o.Username, o.Password
	}
	return e, nil
}
