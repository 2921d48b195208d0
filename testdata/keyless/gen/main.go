// Command gen makes the keyless test material of tests/keyless.rs with a throwaway, local
// Sigstore (sigstore-go's VirtualSigstore: a Fulcio-style CA, CT log, Rekor log and TSA, all
// in memory). Run by hand (scripts/keyless-testdata.sh); its outputs are checked in, since
// verification uses the signing time, not the current time.
//
// Outputs, in the directory given as the only argument:
//
//	module.wasm, config.json, manifest.json  an OCI Wasm artifact (pushed byte for byte)
//	trusted_root.json                        the local Sigstore's trust root
//	trusted_root_expired.json                the same, with the CA valid only before signing
//	oci-ok.sigstore.json                     DSSE (cosign sign predicate) over the manifest digest
//	oci-other-digest.sigstore.json           the same identity, over another digest
//	oci-expired-no-timestamp.sigstore.json   logged after the certificate expired, no TSA stamp
//	oci-tampered-log.sigstore.json           the log entry's body altered
//	module.wasm.sigstore.json                DSSE over the module's sha256 (HTTP modules)
//	legacy-sig.json                          cosign's legacy keyless .sig layer for the manifest:
//	                                         simple-signing payload, signature, certificate and
//	                                         the Rekor bundle annotation
//	identity.txt, issuer.txt                 who signed
package main

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"time"

	protobundle "github.com/sigstore/protobuf-specs/gen/pb-go/bundle/v1"
	protocommon "github.com/sigstore/protobuf-specs/gen/pb-go/common/v1"
	protodsse "github.com/sigstore/protobuf-specs/gen/pb-go/dsse"
	protorekor "github.com/sigstore/protobuf-specs/gen/pb-go/rekor/v1"
	"github.com/sigstore/sigstore-go/pkg/root"
	"github.com/sigstore/sigstore-go/pkg/testing/ca"
	"github.com/sigstore/sigstore-go/pkg/tlog"
	"google.golang.org/protobuf/encoding/protojson"
)

const (
	identity = "https://github.com/example-org/wasm-plugins/.github/workflows/release.yml@refs/tags/v1.0.0"
	issuer   = "https://token.actions.githubusercontent.com"
)

func must(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

// statement is cosign's signing statement for a digest.
func statement(hexDigest string) []byte {
	b, err := json.Marshal(map[string]any{
		"_type":         "https://in-toto.io/Statement/v1",
		"subject":       []any{map[string]any{"name": "module", "digest": map[string]string{"sha256": hexDigest}}},
		"predicateType": "https://sigstore.dev/cosign/sign/v1",
		"predicate":     map[string]any{},
	})
	must(err)
	return b
}

// bundleJSON serialises a VirtualSigstore entity as a sigstore bundle v0.1: its log entry
// carries the log's signed entry timestamp (an inclusion promise) at index 1, signed here with
// the virtual Rekor's key (the virtual inclusion proofs' checkpoints do not match their trees).
func bundleJSON(vs *ca.VirtualSigstore, e *ca.TestEntity, withTimestamps bool) []byte {
	vc, err := e.VerificationContent()
	must(err)
	sc, err := e.SignatureContent()
	must(err)
	entries, err := e.TlogEntries()
	must(err)
	b := &protobundle.Bundle{
		MediaType: "application/vnd.dev.sigstore.bundle+json;version=0.1",
		VerificationMaterial: &protobundle.VerificationMaterial{
			Content: &protobundle.VerificationMaterial_Certificate{
				Certificate: &protocommon.X509Certificate{RawBytes: vc.Certificate().Raw},
			},
			TimestampVerificationData: &protobundle.TimestampVerificationData{},
		},
	}
	for _, t := range entries {
		tle := t.TransparencyLogEntry()
		// The entry as a bundle carries it: its kind and version (from the body) and index.
		var body struct {
			Kind       string `json:"kind"`
			APIVersion string `json:"apiVersion"`
		}
		must(json.Unmarshal(tle.CanonicalizedBody, &body))
		tle.KindVersion = &protorekor.KindVersion{Kind: body.Kind, Version: body.APIVersion}
		tle.LogIndex = 1
		tle.InclusionProof = nil
		logID, err := vs.RekorLogID()
		must(err)
		set, err := vs.RekorSignPayload(tlog.RekorPayload{
			Body:           base64.StdEncoding.EncodeToString(tle.CanonicalizedBody),
			IntegratedTime: tle.IntegratedTime,
			LogIndex:       tle.LogIndex,
			LogID:          logID,
		})
		must(err)
		tle.InclusionPromise = &protorekor.InclusionPromise{SignedEntryTimestamp: set}
		b.VerificationMaterial.TlogEntries = append(b.VerificationMaterial.TlogEntries, tle)
	}
	if withTimestamps {
		ts, err := e.Timestamps()
		must(err)
		for _, t := range ts {
			b.VerificationMaterial.TimestampVerificationData.Rfc3161Timestamps = append(
				b.VerificationMaterial.TimestampVerificationData.Rfc3161Timestamps,
				&protocommon.RFC3161SignedTimestamp{SignedTimestamp: t})
		}
	}
	env := sc.EnvelopeContent().RawEnvelope()
	payload, err := base64.StdEncoding.DecodeString(env.Payload)
	must(err)
	pe := &protodsse.Envelope{Payload: payload, PayloadType: env.PayloadType}
	for _, s := range env.Signatures {
		sig, err := base64.StdEncoding.DecodeString(s.Sig)
		must(err)
		pe.Signatures = append(pe.Signatures, &protodsse.Signature{Sig: sig, Keyid: s.KeyID})
	}
	b.Content = &protobundle.Bundle_DsseEnvelope{DsseEnvelope: pe}
	out, err := protojson.MarshalOptions{Multiline: true}.Marshal(b)
	must(err)
	return out
}

func trustedRoot(vs *ca.VirtualSigstore, expired bool) []byte {
	cas := vs.FulcioCertificateAuthorities()
	if expired {
		// A copy of the CA whose validity ended an hour before anything was signed.
		f := *cas[0].(*root.FulcioCertificateAuthority)
		f.ValidityPeriodStart = time.Now().Add(-48 * time.Hour)
		f.ValidityPeriodEnd = time.Now().Add(-time.Hour)
		cas = []root.CertificateAuthority{&f}
	}
	// No CT log: the virtual Fulcio embeds no SCTs (a private Sigstore without CT).
	tr, err := root.NewTrustedRoot(root.TrustedRootMediaType01, cas, map[string]*root.TransparencyLog{}, vs.TimestampingAuthorities(), vs.RekorLogs())
	must(err)
	out, err := tr.MarshalJSON()
	must(err)
	// The virtual logs are keyed by the hex of their log ID, which the marshalled root carries
	// as base64 of that hex text; a trusted root carries the raw ID.
	var doc map[string]any
	must(json.Unmarshal(out, &doc))
	for _, kind := range []string{"tlogs", "ctlogs"} {
		logs, _ := doc[kind].([]any)
		for _, l := range logs {
			id := l.(map[string]any)["logId"].(map[string]any)
			text, err := base64.StdEncoding.DecodeString(id["keyId"].(string))
			must(err)
			raw, err := hex.DecodeString(string(text))
			must(err)
			id["keyId"] = base64.StdEncoding.EncodeToString(raw)
		}
	}
	out, err = json.MarshalIndent(doc, "", "  ")
	must(err)
	return out
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: gen OUTDIR (reads OUTDIR/module.wasm)")
		os.Exit(2)
	}
	dir := os.Args[1]
	write := func(name string, b []byte) { must(os.WriteFile(filepath.Join(dir, name), b, 0o644)) }
	module, err := os.ReadFile(filepath.Join(dir, "module.wasm"))
	must(err)
	sum := func(b []byte) string { h := sha256.Sum256(b); return hex.EncodeToString(h[:]) }

	// The OCI artifact (Istio/Solo layout), byte for byte what the tests push.
	config := []byte("{}")
	manifest, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.manifest.v1+json",
		"config": map[string]any{
			"mediaType": "application/vnd.module.wasm.config.v1+json",
			"digest":    "sha256:" + sum(config), "size": len(config),
		},
		"layers": []any{map[string]any{
			"mediaType": "application/vnd.module.wasm.content.layer.v1+wasm",
			"digest":    "sha256:" + sum(module), "size": len(module),
		}},
	})
	must(err)
	write("config.json", config)
	write("manifest.json", manifest)
	digest := sum(manifest)

	vs, err := ca.NewVirtualSigstore()
	must(err)
	write("trusted_root.json", trustedRoot(vs, false))
	write("trusted_root_expired.json", trustedRoot(vs, true))
	write("identity.txt", []byte(identity))
	write("issuer.txt", []byte(issuer))

	// Logged two seconds from now (the certificate is issued at the call, valid 10 minutes).
	soon := time.Now().Add(2 * time.Second)
	ok, err := vs.AttestAtTime(identity, issuer, statement(digest), soon, false)
	must(err)
	write("oci-ok.sigstore.json", bundleJSON(vs, ok, true))

	other, err := vs.AttestAtTime(identity, issuer, statement(sum([]byte("another image"))), soon, false)
	must(err)
	write("oci-other-digest.sigstore.json", bundleJSON(vs, other, true))

	// Logged 20 minutes later, when the 10-minute certificate had expired; no TSA timestamp.
	late, err := vs.AttestAtTime(identity, issuer, statement(digest), time.Now().Add(20*time.Minute), false)
	must(err)
	write("oci-expired-no-timestamp.sigstore.json", bundleJSON(vs, late, false))

	// The log entry's body changed after the log signed it.
	var tampered map[string]any
	must(json.Unmarshal(bundleJSON(vs, ok, true), &tampered))
	entry := tampered["verificationMaterial"].(map[string]any)["tlogEntries"].([]any)[0].(map[string]any)
	body, err := base64.StdEncoding.DecodeString(entry["canonicalizedBody"].(string))
	must(err)
	var b map[string]any
	must(json.Unmarshal(body, &b))
	b["apiVersion"] = "0.0.2"
	nb, err := json.Marshal(b)
	must(err)
	entry["canonicalizedBody"] = base64.StdEncoding.EncodeToString(nb)
	tj, err := json.MarshalIndent(tampered, "", "  ")
	must(err)
	write("oci-tampered-log.sigstore.json", tj)

	http, err := vs.AttestAtTime(identity, issuer, statement(sum(module)), soon, false)
	must(err)
	write("module.wasm.sigstore.json", bundleJSON(vs, http, true))
	// cosign's legacy keyless layout: a simple-signing payload signed by the certificate's key,
	// the entry's signed timestamp in the `dev.sigstore.cosign/bundle` annotation.
	payload, err := json.Marshal(map[string]any{
		"critical": map[string]any{
			"identity": map[string]string{"docker-reference": "registry.example/kl/mod"},
			"image":    map[string]string{"docker-manifest-digest": "sha256:" + digest},
			"type":     "cosign container image signature",
		},
		"optional": nil,
	})
	must(err)
	legacy, err := vs.SignAtTime(identity, issuer, payload, soon)
	must(err)
	vc, err := legacy.VerificationContent()
	must(err)
	sc, err := legacy.SignatureContent()
	must(err)
	entries, err := legacy.TlogEntries()
	must(err)
	tle := entries[0].TransparencyLogEntry()
	logID, err := vs.RekorLogID()
	must(err)
	rp := tlog.RekorPayload{
		Body:           base64.StdEncoding.EncodeToString(tle.CanonicalizedBody),
		IntegratedTime: tle.IntegratedTime,
		LogIndex:       1,
		LogID:          logID,
	}
	set, err := vs.RekorSignPayload(rp)
	must(err)
	annotation, err := json.Marshal(map[string]any{
		"SignedEntryTimestamp": base64.StdEncoding.EncodeToString(set),
		"Payload": map[string]any{
			"body": rp.Body, "integratedTime": rp.IntegratedTime, "logIndex": rp.LogIndex, "logID": rp.LogID,
		},
	})
	must(err)
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: vc.Certificate().Raw})
	legacyJSON, err := json.MarshalIndent(map[string]string{
		"payload":     base64.StdEncoding.EncodeToString(payload),
		"signature":   base64.StdEncoding.EncodeToString(sc.Signature()),
		"certificate": string(certPEM),
		"bundle":      string(annotation),
	}, "", "  ")
	must(err)
	write("legacy-sig.json", legacyJSON)

	fmt.Printf("manifest digest sha256:%s, module sha256:%s\n", digest, sum(module))
}
