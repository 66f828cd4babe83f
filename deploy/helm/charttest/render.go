// Package charttest renders and checks the Helm chart deploy/helm/keyvault
// with the Helm Go SDK, so that `make test` lints it, renders both modes and
// decodes every manifest strictly into the Kubernetes API types without a
// helm binary. It is a module of its own to keep Helm and the Kubernetes
// modules out of keyvault's. gen/ writes deploy/kubernetes from the chart.
package charttest

import (
	"bytes"
	"fmt"
	"path"
	"sort"
	"strings"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"helm.sh/helm/v4/pkg/chart/common"
	"helm.sh/helm/v4/pkg/chart/common/util"
	"helm.sh/helm/v4/pkg/chart/loader"
	"helm.sh/helm/v4/pkg/engine"
	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	"sigs.k8s.io/yaml"
)

// Release is the release name and namespace every render uses; with the
// name "keyvault" the objects are named keyvault, keyvault-config, ...
const (
	Release   = "keyvault"
	Namespace = "keyvault"
)

// RawKitValues are the values deploy/kubernetes is rendered with: mode
// bbolt, the Prometheus Operator objects and the keys Job included (the
// generator puts the Job in deploy/kubernetes/setup).
func RawKitValues() map[string]any {
	return map[string]any{
		"mode":       "bbolt",
		"keysInit":   map[string]any{"enabled": true},
		"monitoring": map[string]any{"serviceMonitor": map[string]any{"enabled": true}, "prometheusRule": map[string]any{"enabled": true}},
	}
}

// Manifest is one rendered document: the template it came from, its text,
// and the object it decodes to.
type Manifest struct {
	Template string // templates/x.yaml
	Text     string
	Kind     string
	Name     string
	Object   any // *corev1.ConfigMap, *appsv1.StatefulSet, ...
}

// Render renders the chart at dir with vals over its values.yaml, as
// `helm template keyvault dir --namespace keyvault` does, and returns the
// non-empty templates by path (templates/x.yaml).
func Render(dir string, vals map[string]any) (map[string]string, error) {
	ch, err := loader.Load(dir)
	if err != nil {
		return nil, fmt.Errorf("load chart %s: %w", dir, err)
	}
	top, err := util.ToRenderValues(ch, vals, common.ReleaseOptions{Name: Release, Namespace: Namespace, Revision: 1, IsInstall: true}, nil)
	if err != nil {
		return nil, fmt.Errorf("values: %w", err)
	}
	out, err := engine.Render(ch, top)
	if err != nil {
		return nil, fmt.Errorf("render: %w", err)
	}
	files := map[string]string{}
	for name, text := range out {
		if path.Ext(name) != ".yaml" || strings.TrimSpace(stripComments(text)) == "" {
			continue // helpers, NOTES.txt, templates switched off by values
		}
		files[strings.TrimPrefix(name, "keyvault/")] = text
	}
	return files, nil
}

// stripComments drops whole-line YAML comments, to tell an empty render
// from one with only its header comment.
func stripComments(s string) string {
	var b strings.Builder
	for _, l := range strings.Split(s, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			b.WriteString(l)
			b.WriteByte('\n')
		}
	}
	return b.String()
}

// newObject returns the Kubernetes API type of a kind, for strict decoding.
func newObject(apiVersion, kind string) (any, error) {
	switch apiVersion + " " + kind {
	case "v1 ConfigMap":
		return &corev1.ConfigMap{}, nil
	case "v1 Service":
		return &corev1.Service{}, nil
	case "apps/v1 StatefulSet":
		return &appsv1.StatefulSet{}, nil
	case "apps/v1 Deployment":
		return &appsv1.Deployment{}, nil
	case "batch/v1 Job":
		return &batchv1.Job{}, nil
	case "policy/v1 PodDisruptionBudget":
		return &policyv1.PodDisruptionBudget{}, nil
	case "networking.k8s.io/v1 NetworkPolicy":
		return &networkingv1.NetworkPolicy{}, nil
	case "monitoring.coreos.com/v1 ServiceMonitor":
		return &monitoringv1.ServiceMonitor{}, nil
	case "monitoring.coreos.com/v1 PrometheusRule":
		return &monitoringv1.PrometheusRule{}, nil
	}
	return nil, fmt.Errorf("apiVersion %q kind %q: no API type to check it against", apiVersion, kind)
}

// Decode decodes every document of the rendered files strictly into its
// API type: an unknown or misspelt field, a duplicate key or a wrong type is
// an error, as the API server's strict field validation would refuse it.
func Decode(files map[string]string) ([]Manifest, error) {
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	var ms []Manifest
	var errs []string
	for _, n := range names {
		for _, doc := range bytes.Split([]byte(files[n]), []byte("\n---")) {
			if strings.TrimSpace(stripComments(string(doc))) == "" {
				continue
			}
			var tm struct {
				APIVersion string `json:"apiVersion"`
				Kind       string `json:"kind"`
				Metadata   struct {
					Name string `json:"name"`
				} `json:"metadata"`
			}
			if err := yaml.Unmarshal(doc, &tm); err != nil {
				errs = append(errs, fmt.Sprintf("%s: %v", n, err))
				continue
			}
			obj, err := newObject(tm.APIVersion, tm.Kind)
			if err != nil {
				errs = append(errs, fmt.Sprintf("%s: %v", n, err))
				continue
			}
			if err := yaml.UnmarshalStrict(doc, obj); err != nil {
				errs = append(errs, fmt.Sprintf("%s: %s %s: %v", n, tm.Kind, tm.Metadata.Name, err))
				continue
			}
			ms = append(ms, Manifest{Template: n, Text: string(doc), Kind: tm.Kind, Name: tm.Metadata.Name, Object: obj})
		}
	}
	if len(errs) > 0 {
		return ms, fmt.Errorf("%s", strings.Join(errs, "\n"))
	}
	return ms, nil
}

// RawKitHeader follows the first line of every file of deploy/kubernetes.
const RawKitHeader = `#
# GENERATED from the Helm chart deploy/helm/keyvault (mode bbolt, release
# keyvault, values charttest.RawKitValues) by deploy/helm/generate.sh: edit
# the chart, then run the script. The chart test fails while they differ.
`

// RawKit renders deploy/kubernetes from the chart at dir: its files by path
// relative to deploy/kubernetes, the keys Job under setup/ so that
// `kubectl apply -f deploy/kubernetes/` never runs it.
func RawKit(dir string) (map[string]string, error) {
	files, err := Render(dir, RawKitValues())
	if err != nil {
		return nil, err
	}
	kit := map[string]string{}
	for name, text := range files {
		rel := path.Base(name)
		if rel == "keys-init-job.yaml" {
			rel = "setup/" + rel
		}
		first, rest, _ := strings.Cut(strings.TrimLeft(text, "\n"), "\n")
		kit[rel] = first + "\n" + RawKitHeader + rest
		if !strings.HasSuffix(kit[rel], "\n") {
			kit[rel] += "\n"
		}
	}
	return kit, nil
}
