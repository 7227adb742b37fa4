"""The image-upload parser behind /classify and /detect (service/uploads.py), without a server."""

from __future__ import annotations

import random

import httpx
import pytest

from models.errors import InvalidInput
from service.uploads import int_option, parse_header_value, parse_multipart, read_image_upload, str_option

OPTIONS = {"top_k": int_option(1, 1000), "model": str_option(64)}


def encoded(files=None, data=None) -> tuple[bytes, str]:
    """A multipart body exactly as httpx (a real third-party client) encodes it."""
    req = httpx.Request("POST", "http://x/", files=files, data=data)
    return req.read(), req.headers["content-type"]


def test_httpx_multipart_round_trips() -> None:
    image = bytes(range(256)) * 300 + b"\r\n--not-the-boundary\r\n"
    body, ctype = encoded(files={"image": ("cat photo.jpg", image, "image/jpeg")}, data={"top_k": "3", "model": "m"})
    data, opts = read_image_upload(body, ctype, {}, OPTIONS)
    assert data == image
    assert opts == {"top_k": 3, "model": "m"}


def test_parts_keep_filename_and_type() -> None:
    body, ctype = encoded(files={"image": ("a.png", b"\x89PNG", "image/png")})
    _, params = parse_header_value(ctype)
    part = parse_multipart(body, params["boundary"])["image"]
    assert (part.filename, part.content_type, part.data) == ("a.png", "image/png", b"\x89PNG")


def test_hand_written_body_with_preamble_quoted_boundary_and_epilogue() -> None:
    body = (
        b"this preamble is ignored\r\n"
        b"--b0und\r\n"
        b'Content-Disposition: form-data; name="image"; filename="x \\"q\\".jpg"\r\n\r\n'
        b"IMG\r\nBYTES\r\n"
        b"--b0und\r\n"
        b'Content-Disposition: form-data; name="top_k"\r\n\r\n'
        b"7\r\n"
        b"--b0und--\r\nepilogue"
    )
    parts = parse_multipart(body, "b0und")
    assert parts["image"].data == b"IMG\r\nBYTES"
    assert parts["image"].filename == 'x "q".jpg'
    data, opts = read_image_upload(body, 'multipart/form-data; boundary="b0und"', {}, OPTIONS)
    assert (data, opts) == (b"IMG\r\nBYTES", {"top_k": 7})


def test_raw_body_takes_options_from_the_query() -> None:
    for ctype in ("image/jpeg", "image/png; charset=binary", "application/octet-stream", "IMAGE/WEBP"):
        data, opts = read_image_upload(b"raw", ctype, {"top_k": "2", "other": "x"}, OPTIONS)
        assert (data, opts) == (b"raw", {"top_k": 2})


def test_form_fields_win_over_the_query() -> None:
    body, ctype = encoded(files={"image": ("a", b"i")}, data={"top_k": "4"})
    assert read_image_upload(body, ctype, {"top_k": "9"}, OPTIONS)[1] == {"top_k": 4}


@pytest.mark.parametrize(
    ("body", "ctype", "needle"),
    [
        (b"x", "application/json", "image"),
        (b"x", None, "image"),
        (b"x", "text/plain", "image"),
        (b"--zz\r\n", "multipart/form-data", "boundary"),
        (b"no boundary here", "multipart/form-data; boundary=zz", "never appears"),
        (
            b"--zz\r\nContent-Disposition: form-data; name=image\r\n\r\nabc",
            "multipart/form-data; boundary=zz",
            "truncated",
        ),
        (b"--zz\r\nContent-Disposition: form-data; name=image\r\nabc", "multipart/form-data; boundary=zz", "headers"),
        (b"--zzGARBAGE", "multipart/form-data; boundary=zz", "line break"),
        (b"--zz\r\nContent-Type: text/plain\r\n\r\nabc\r\n--zz--", "multipart/form-data; boundary=zz", "Disposition"),
        (b"--zz\r\nContent-Disposition: attachment\r\n\r\nabc\r\n--zz--", "multipart/form-data; boundary=zz", "name"),
        (b"--zz\r\nno colon line\r\n\r\nabc\r\n--zz--", "multipart/form-data; boundary=zz", "header line"),
        (b"--zz\r\n\r\nheaderless\r\n--zz--", "multipart/form-data; boundary=zz", "Disposition"),
        (
            b"--zz\r\nContent-Disposition: form-data; name=top_k\r\n\r\n3\r\n--zz--",
            "multipart/form-data; boundary=zz",
            "no `image`",
        ),
        (
            b"--zz\r\nContent-Disposition: form-data; name=image\r\n\r\na\r\n"
            b"--zz\r\nContent-Disposition: form-data; name=image\r\n\r\nb\r\n--zz--",
            "multipart/form-data; boundary=zz",
            "more than once",
        ),
        (
            b"--zz\r\nContent-Disposition: form-data; name=image\r\n\r\na\r\n"
            b"--zz\r\nContent-Disposition: form-data; name=top_k\r\n\r\n\xff\xfe\r\n--zz--",
            "multipart/form-data; boundary=zz",
            "UTF-8",
        ),
    ],
)
def test_malformed_bodies_are_invalid_input_naming_the_problem(body, ctype, needle) -> None:
    with pytest.raises(InvalidInput) as err:
        read_image_upload(body, ctype, {}, OPTIONS)
    assert err.value.status_code == 400
    assert needle in str(err.value)


@pytest.mark.parametrize(
    ("query", "needle"),
    [({"top_k": "0"}, "between 1 and 1000"), ({"top_k": "many"}, "integer"), ({"model": "m" * 65}, "64")],
)
def test_bad_options_name_the_field(query, needle) -> None:
    with pytest.raises(InvalidInput) as err:
        read_image_upload(b"img", "image/png", query, OPTIONS)
    assert "invalid request: " + next(iter(query)) in str(err.value) and needle in str(err.value)


def test_too_many_parts_is_refused() -> None:
    files = {"image": ("a", b"i")}
    data = {f"f{i}": "v" for i in range(40)}
    body, ctype = encoded(files=files, data=data)
    with pytest.raises(InvalidInput, match="more than 32 parts"):
        read_image_upload(body, ctype, {}, OPTIONS)


def test_random_mutations_only_ever_raise_invalid_input() -> None:
    """Fuzz: flip, cut and splice bytes of a valid body; the parser answers or says why, never crashes."""
    good, ctype = encoded(files={"image": ("a.jpg", bytes(range(200)))}, data={"top_k": "3"})
    rng = random.Random(1234)
    outcomes = {"ok": 0, "invalid": 0}
    for _ in range(3000):
        body = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            at = rng.randrange(len(body) + 1)
            if op < 0.4 and body:
                body[min(at, len(body) - 1)] = rng.randrange(256)
            elif op < 0.7:
                del body[at : at + rng.randint(1, 40)]
            else:
                body[at:at] = rng.choice([b"\r\n", b"--", b'"', b";", b"\r\n\r\n", good[:30]])
        try:
            read_image_upload(bytes(body), ctype, {}, OPTIONS)
            outcomes["ok"] += 1
        except InvalidInput as e:
            assert e.status_code == 400 and str(e)
            outcomes["invalid"] += 1
    assert outcomes["ok"] > 100 and outcomes["invalid"] > 100, outcomes
