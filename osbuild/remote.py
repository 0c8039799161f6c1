"""Share trees, outputs and source files between build hosts through an S3 bucket.

`--remote s3://BUCKET/PREFIX` names the bucket; endpoint, credentials and
region come from boto3's usual places (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, ~/.aws/config and credentials).
Layout below PREFIX:

    refs/<id>                      JSON {"treesum", "archive", "size"} for a stage or output id
    archives/<sha256>.tar.zst      a tree packed by osbuild.util.treearchive, named by its bytes
    sources/<source>/<checksum>    a source file, named by its checksum

Everything is written with a conditional PUT (If-None-Match: *): the first
writer of a key wins and nothing is ever overwritten. A ref is written only
after its archive exists. A pulled tree is used only if the archive has the
size and SHA-256 the ref records, passes `treearchive.check()`, and the
unpacked tree's treesum equals the ref's; a pulled source file only if its
content has its checksum. Anything else is a warning and the work is done
locally. This detects corruption and truncation; it does not protect against
someone who may write the bucket, who can record any tree under any id.

No failure of the remote fails a build: the first error that says the remote
is unusable (unreachable, bad credentials, no bucket) prints one warning and
switches the remote off for the rest of the run.
"""

import hashlib
import json
import os
import re
import sys
import time

from osbuild.treesum import TreeError, treesum
from osbuild.util import treearchive
from osbuild.util.workdir import WorkDir

INSTALL_HINT = "install boto3 1.35 or later (pip install boto3)"
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
MAX_REF_BYTES = 4096
PARALLEL = 4


class RemoteError(Exception):
    """A --remote URL that cannot be used at all (bad syntax)."""


class _Unusable(Exception):
    """The remote cannot be used any more in this run."""


def parse_url(url):
    """Split `s3://BUCKET/PREFIX` into (bucket, prefix); raise RemoteError if malformed."""
    if not isinstance(url, str) or not url.startswith("s3://"):
        raise RemoteError(f"--remote {url!r}: expected s3://BUCKET/PREFIX")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise RemoteError(f"--remote {url!r}: {bucket!r} is not a valid bucket name")
    prefix = prefix.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise RemoteError(f"--remote {url!r}: the prefix has an empty, '.' or '..' part")
    if any(ord(c) < 32 or ord(c) == 127 for c in prefix):
        raise RemoteError(f"--remote {url!r}: control character in the prefix")
    return bucket, prefix


def warn(text):
    """One warning line on stderr."""
    print(f"osbuild: warning: remote: {text}", file=sys.stderr, flush=True)


def _file_digest(path, algo="sha256"):
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _checksum_matches(path, checksum):
    algo, _, digest = checksum.partition(":")
    if algo not in ("sha256", "sha384", "sha512"):
        return False
    return _file_digest(path, algo) == digest


def shareable_checksums(options, checksums):
    """The checksums whose content a source fetched without secrets (safe to upload).

    Only sources with a `urls` map (org.osbuild.files) are content-addressed
    this way; an entry that names secrets is never uploaded.
    """
    urls = options.get("urls") if isinstance(options, dict) else None
    if not isinstance(urls, dict):
        return []
    return [c for c in checksums
            if isinstance(urls.get(c), str)
            or isinstance(urls.get(c), dict) and "secrets" not in urls[c]]


def shared_ids(pipeline, checkpoints):
    """Ids to push after a build: checkpoints, each pipeline's tree and output."""
    ids = []
    while pipeline is not None:
        ids += [s.id for s in pipeline.stages if s.id in checkpoints]
        ids += [i for i in (pipeline.tree_id, pipeline.output_id) if i]
        pipeline = pipeline.build
    return list(dict.fromkeys(ids))


class Remote:
    """An S3 bucket prefix shared by build hosts. Use `open_remote()`."""

    def __init__(self, url, client, verbose=True):
        self.url = url
        self.bucket, self.prefix = parse_url(url)
        self.client = client
        self.verbose = verbose
        self.usable = True
        self._absent = set()
        # errors of the service that mean "this key is not there"
        self._missing_codes = {"404", "NoSuchKey", "NotFound"}

    def info(self, text):
        """A progress line in human mode."""
        if self.verbose:
            print(f"remote: {text}", file=sys.stderr, flush=True)

    def key(self, *parts):
        """The object key of `parts` below the prefix."""
        return "/".join(([self.prefix] if self.prefix else []) + list(parts))

    # ------------------------------------------------------------ transport

    def _classify(self, e):
        """Return 'missing', 'exists' or raise _Unusable / re-raise for other errors."""
        import botocore.exceptions  # pylint: disable=import-outside-toplevel
        if isinstance(e, botocore.exceptions.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in self._missing_codes or status == 404 and code != "NoSuchBucket":
                return "missing"
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict") \
                    or status in (409, 412):
                return "exists"
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
                        "403", "Forbidden") or status == 403:
                raise _Unusable(f"access to {self.url} denied ({code or status}): check "
                                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY") from None
            if code == "NoSuchBucket":
                raise _Unusable(f"bucket {self.bucket!r} does not exist") from None
            raise _Unusable(f"{self.url}: {code or status}: {err.get('Message', '')}".rstrip(
                ": ")) from None
        if isinstance(e, (botocore.exceptions.BotoCoreError, OSError)):
            raise _Unusable(f"{self.url} unreachable: {e}") from None
        raise e

    def _call(self, fn, *args, **kwargs):
        """Run a client call; returns (result, None) or (None, 'missing'|'exists')."""
        if not self.usable:
            raise _Unusable(None)
        try:
            return fn(*args, **kwargs), None
        except Exception as e:  # pylint: disable=broad-exception-caught
            return None, self._classify(e)

    def _disable(self, e):
        if self.usable and e.args and e.args[0]:
            warn(f"{e.args[0]}; building locally without the remote")
        self.usable = False

    def check(self):
        """Probe the bucket once; returns whether the remote is usable."""
        try:
            _, problem = self._call(self.client.head_bucket, Bucket=self.bucket)
            if problem == "missing":
                raise _Unusable(f"bucket {self.bucket!r} does not exist")
        except _Unusable as e:
            self._disable(e)
        return self.usable

    def exists(self, key):
        """Whether `key` is in the bucket."""
        _, problem = self._call(self.client.head_object, Bucket=self.bucket, Key=key)
        return problem is None

    def put_if_absent(self, key, path=None, body=None):
        """Create `key` from the file `path` or bytes `body` unless it exists; True if created."""
        if path is not None:
            with open(path, "rb") as f:
                _, problem = self._call(self.client.put_object, Bucket=self.bucket, Key=key,
                                        Body=f, IfNoneMatch="*")
        else:
            _, problem = self._call(self.client.put_object, Bucket=self.bucket, Key=key,
                                    Body=body, IfNoneMatch="*")
        return problem is None

    def download(self, key, path, limit):
        """Write `key` to `path`; returns (size, sha256) or None if missing or over `limit`."""
        reply, problem = self._call(self.client.get_object, Bucket=self.bucket, Key=key)
        if problem:
            return None
        size = 0
        digest = hashlib.sha256()
        body = reply["Body"]
        try:
            with open(path, "wb") as f:
                for chunk in body.iter_chunks(1 << 20):
                    size += len(chunk)
                    if size > limit:
                        return None
                    digest.update(chunk)
                    f.write(chunk)
        except Exception as e:  # pylint: disable=broad-exception-caught
            self._classify(e)
            raise
        finally:
            body.close()
        return size, digest.hexdigest()

    def _get_ref(self, object_id, workdir):
        path = os.path.join(workdir, "ref.json")
        got = self.download(self.key("refs", object_id), path, MAX_REF_BYTES)
        if got is None:
            return None
        try:
            with open(path, encoding="utf-8") as f:
                ref = json.load(f)
        except (ValueError, UnicodeError):
            ref = None
        if not isinstance(ref, dict) or not all(isinstance(ref.get(k), str) and
                                                _HEX64.fullmatch(ref[k])
                                                for k in ("treesum", "archive")) \
                or not isinstance(ref.get("size"), int) or ref["size"] < 0:
            warn(f"ref {object_id} is malformed; ignoring it")
            return None
        return ref

    # ---------------------------------------------------------------- trees

    def pull(self, store, object_id):
        """Fetch `object_id` into the local store if the remote has it; True on success."""
        if not self.usable or object_id in self._absent:
            return False
        from osbuild.objectstore import Object  # pylint: disable=import-outside-toplevel
        start = time.monotonic()
        try:
            with Object(store) as obj:
                ref = self._get_ref(object_id, obj.workdir)
                if ref is None:
                    self._absent.add(object_id)
                    return False
                if not self._unpack_into(obj, object_id, ref):
                    self._absent.add(object_id)
                    return False
                store.commit(obj, object_id)
        except _Unusable as e:
            self._disable(e)
            return False
        self.info(f"pulled {object_id} ({ref['size'] / 1e6:.1f} MB, "
                  f"{time.monotonic() - start:.1f} s)")
        return True

    def _unpack_into(self, obj, object_id, ref):
        archive = os.path.join(obj.workdir, "archive.tar.zst")
        got = self.download(self.key("archives", ref["archive"] + ".tar.zst"), archive,
                            ref["size"])
        if got is None:
            warn(f"archive of {object_id} is missing or larger than recorded; building locally")
            return False
        if got != (ref["size"], ref["archive"]):
            warn(f"archive of {object_id} is truncated or corrupt (size {got[0]}, "
                 f"expected {ref['size']}); building locally")
            return False
        tree = obj.write()
        try:
            treearchive.unpack(archive, tree)
        except treearchive.ArchiveError as e:
            warn(f"archive of {object_id} refused: {e}; building locally")
            return False
        finally:
            os.unlink(archive)
        seen = {}
        try:
            actual = treesum(tree, seen=seen)
        except TreeError as e:
            warn(f"tree of {object_id} refused: {e}; building locally")
            return False
        if actual != ref["treesum"]:
            warn(f"tree of {object_id} does not match its recorded treesum "
                 f"(got {actual}); building locally")
            return False
        obj.known = seen  # the commit then hashes no file a second time
        return True

    def push(self, store, ids):
        """Upload the local trees of `ids` that the remote does not have yet."""
        for object_id in ids:
            path = store.resolve_ref(object_id)
            if path is None or not self.usable:
                continue
            try:
                self._push_one(store, object_id, path)
            except _Unusable as e:
                self._disable(e)
            except treearchive.ArchiveError as e:
                warn(f"cannot pack {object_id}: {e}")

    def _push_one(self, store, object_id, path):
        ref_key = self.key("refs", object_id)
        if self.exists(ref_key):
            return
        start = time.monotonic()
        work = WorkDir(store.tmp, "work-remote-")
        try:
            archive = os.path.join(work.path, "archive.tar.zst")
            treearchive.pack(path, archive)
            size = os.path.getsize(archive)
            digest = _file_digest(archive)
            archive_key = self.key("archives", digest + ".tar.zst")
            if not self.exists(archive_key):
                self.put_if_absent(archive_key, path=archive)
        finally:
            work.cleanup()
        ref = {"treesum": os.path.basename(path), "archive": digest, "size": size}
        if self.put_if_absent(ref_key, body=json.dumps(ref, sort_keys=True).encode()):
            self.info(f"pushed {object_id} ({size / 1e6:.1f} MB, "
                      f"{time.monotonic() - start:.1f} s)")

    # -------------------------------------------------------------- sources

    def fetch_sources(self, name, checksums, cache, options):
        """Put into `cache` each of `checksums` that it lacks and the remote has.

        Only checksums the source fetches without secrets are looked up: what
        needs an entitlement is fetched with it, never from the bucket.
        """
        todo = [c for c in shareable_checksums(options, list(dict.fromkeys(checksums)))
                if not os.path.isfile(os.path.join(cache, c))]
        if not todo or not self.usable:
            return []
        # locked: the source program's clean-up of dead work dirs leaves it alone
        with WorkDir(cache, "work-remote-") as tmpdir:
            got = self._parallel(lambda c: self._fetch_source(name, c, cache, tmpdir.path), todo)
        if got:
            self.info(f"{len(got)} of {len(todo)} missing {name} file(s) from the remote")
        return got

    def _fetch_source(self, name, checksum, cache, tmpdir):
        key = self.key("sources", name, checksum)
        if key in self._absent:
            return False
        tmp = os.path.join(tmpdir, checksum)
        if self.download(key, tmp, treearchive.MAX_TREE_BYTES) is None:
            self._absent.add(key)
            return False
        if not _checksum_matches(tmp, checksum):
            warn(f"{name} file {checksum} in the remote has other content; ignoring it")
            os.unlink(tmp)
            return False
        os.chmod(tmp, 0o644)
        os.rename(tmp, os.path.join(cache, checksum))
        return True

    def upload_sources(self, name, checksums, cache, options):
        """Upload the files `checksums` of `cache` that were fetched without secrets.

        `options` are the source's options; each file must verify against its
        checksum and be absent from the remote.
        """
        checksums = shareable_checksums(options, checksums)
        if not checksums or not self.usable:
            return
        self._parallel(lambda c: self._upload_source(name, c, cache), checksums)

    def _upload_source(self, name, checksum, cache):
        path = os.path.join(cache, checksum)
        key = self.key("sources", name, checksum)
        if not os.path.isfile(path) or not _checksum_matches(path, checksum) \
                or self.exists(key):
            return False
        return self.put_if_absent(key, path=path)

    def _parallel(self, fn, items):
        """Run `fn` on each item in a few threads; returns the items it returned True for."""
        def guarded(item):
            try:
                return fn(item)
            except _Unusable as e:
                self._disable(e)
                return False
        # imported here: a build without --remote does not pay for it at start-up
        import concurrent.futures  # pylint: disable=import-outside-toplevel
        with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
            return [i for i, ok in zip(items, pool.map(guarded, items)) if ok]


def _version(text):
    try:
        return tuple(int(part) for part in text.split(".")[:2])
    except ValueError:
        return (0, 0)


def open_remote(url, verbose=True):
    """The Remote for `url`, or None (with a warning) when it cannot be used.

    Raises RemoteError for a malformed URL.
    """
    parse_url(url)
    try:
        import boto3  # pylint: disable=import-outside-toplevel
        import botocore.config  # pylint: disable=import-outside-toplevel
    except ImportError:
        warn(f"--remote needs the boto3 module: {INSTALL_HINT}; building locally")
        return None
    if _version(boto3.__version__) < (1, 35):
        warn(f"--remote needs conditional PUT, which boto3 {boto3.__version__} lacks: "
             f"{INSTALL_HINT}; building locally")
        return None
    config = botocore.config.Config(
        connect_timeout=5, read_timeout=60, retries={"max_attempts": 2, "mode": "standard"},
        max_pool_connections=PARALLEL * 2,
        # S3-compatible stores (radosgw, ...) often refuse the newer trailing checksums
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required")
    try:
        client = boto3.session.Session().client("s3", config=config)
    except Exception as e:  # pylint: disable=broad-exception-caught
        warn(f"cannot set up the S3 client: {e}; building locally")
        return None
    remote = Remote(url, client, verbose)
    return remote if remote.check() else None
