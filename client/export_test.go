package client

import (
	"context"
	"time"
)

// Hooks for the external tests.

// SetSleep makes c call f instead of sleeping before a retry.
func SetSleep(c *Client, f func(ctx context.Context, d time.Duration) error) { c.sleep = f }

// SetJitter makes c add f(d/4) to a backoff d instead of random jitter.
func SetJitter(c *Client, f func(time.Duration) time.Duration) { c.jitter = f }

var (
	ParseRetryAfter  = parseRetryAfter
	AppendJSONString = appendJSONString
)
