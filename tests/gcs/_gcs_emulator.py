"""A local GCS emulator on loopback for the gs:// tests: `python _gcs_emulator.py BUCKET...` serves
gcp-storage-emulator in memory on a free 127.0.0.1 port, prints `PORT <n>` once it listens, and serves until
killed.

gcp-storage-emulator is a stub of the JSON API; the behaviours of real GCS that the clients crossjax uses rely
on are missing from it and added here, in front of its handlers:
- preconditions: `ifGenerationMatch` (0: the object must not exist) answers 412 when unmet, on uploads,
  downloads and deletes; `ifGenerationNotMatch` answers 304. The store's meta.json and the gs:// locks
  rest on these.
- downloads carry `x-goog-generation`, the generation a conditional write compares with.
- empty objects can be uploaded (the stub fails on an empty body).
- listings honour `startOffset` / `endOffset` (tensorstore lists a prefix as a key range).
"""
from __future__ import annotations

import sys
from functools import partial
from http import HTTPStatus
from http.server import HTTPServer

from gcp_storage_emulator import server as emulator
from gcp_storage_emulator.handlers import buckets, objects
from gcp_storage_emulator.storage import Storage


def _generation(storage, bucket, name):
    if not bucket or not name:
        return None
    try:
        return str(storage.get_file_obj(bucket, name)["generation"])
    except Exception:  # NotFound, or an unknown bucket
        return None


def _fail(response, status):
    response.status = status
    response.json({"error": {"code": status.value, "message": status.phrase,
                             "errors": [{"reason": "conditionNotMet", "message": status.phrase}]}})


def _guarded(handler, kind):
    def guarded(request, response, storage, *args, **kwargs):
        params, query = request.params or {}, request.query
        name = params.get("object_id") or (query.get("name") or [None])[0]
        if name is None and kind == "upload" and (query.get("uploadType") or [""])[0] == "multipart":
            name = (request.data.get("meta") or {}).get("name")  # the object's name is in the metadata part
        current = _generation(storage, params.get("bucket_name"), name)
        if kind != "ls":
            want = (query.get("ifGenerationMatch") or [None])[0]
            if want is not None and ((want == "0") != (current is None) or (want != "0" and want != current)):
                return _fail(response, HTTPStatus.PRECONDITION_FAILED)
            unwanted = (query.get("ifGenerationNotMatch") or [None])[0]
            if unwanted is not None and unwanted == current:
                response.status = HTTPStatus.NOT_MODIFIED
                return None
        if kind == "upload" and (query.get("uploadType") or ["media"])[0] == "media" and request.data is None:
            request._data = b""  # an empty object (a done marker): the stub reads no body as None
        result = handler(request, response, storage, *args, **kwargs)
        media = kind == "download" or (kind == "get" and (query.get("alt") or [""])[0] == "media")
        if media and response.status == HTTPStatus.OK and current is not None:
            response["x-goog-generation"] = current
            response["x-goog-metageneration"] = "1"
        if kind == "ls" and response.status == HTTPStatus.OK:
            import json
            body = json.loads(response._content)
            start, end = (query.get("startOffset") or [""])[0], (query.get("endOffset") or [None])[0]
            body["items"] = [o for o in body.get("items") or []
                             if o["name"] >= start and (end is None or o["name"] < end)]
            response.json(body)
        return result
    return guarded


def _install_guards() -> None:
    kinds = {objects.download: "download", objects.get: "get", objects.delete: "delete", objects.insert: "upload",
             objects.xml_upload: "upload", objects.ls: "ls"}
    for _, handlers in emulator.HANDLERS:
        for method, fn in list(handlers.items()):
            if fn in kinds:
                handlers[method] = _guarded(fn, kinds[fn])
    # the router's fallback for uploads without the /upload prefix
    objects.insert = _guarded(objects.insert, "upload")


def main(bucket_names: list[str]) -> None:
    _install_guards()
    storage = Storage(use_memory_fs=True)
    for name in bucket_names:
        buckets.create_bucket(name, storage)
    httpd = HTTPServer(("127.0.0.1", 0), partial(emulator.RequestHandler, storage))
    print(f"PORT {httpd.server_address[1]}", flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    import logging
    logging.disable(logging.CRITICAL)
    main(sys.argv[1:])
