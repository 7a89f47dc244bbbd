"""The validation boundary: API params as the service validates them (JSON mode, strict),
the envelope, and error details that name the offending field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from image_service.errors import ApiError, ErrorCode
from image_service.params import AddImage, ImageFormat, MediaType, Query, UpdateImage
from image_service.pipeline import parse_envelope
from image_service.protocol.errors import validation_details

U1, U2 = "a" * 32, "b" * 32


def add_image(**overrides: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "name": "CentOS7",
        "url": "http://127.0.0.1:8080/centos7.qcow2",
        "format": "qcow2",
        "backupStorageUuids": [U1],
    }
    params.update(overrides)
    return {k: v for k, v in params.items() if v is not ...}


def validate(model: type[BaseModel], params: dict[str, Any]) -> Any:
    """How the service validates: `model_validate_json(json.dumps(params))`."""
    return model.model_validate_json(json.dumps(params))


def rejected(model: type[BaseModel], params: dict[str, Any]) -> str:
    """Validate, expect a failure, and return the service's error details."""
    with pytest.raises(ValidationError) as excinfo:
        validate(model, params)
    return validation_details(excinfo.value)


# --- AddImage ----------------------------------------------------------------------------


def test_defaults_are_the_seeds() -> None:
    image = validate(AddImage, add_image())
    assert image.mediaType is MediaType.RootVolumeTemplate
    assert (image.platform, image.system, image.type) == ("Linux", False, "zstack")
    assert image.effective_format is ImageFormat.qcow2


@pytest.mark.parametrize(
    "name", ["a/b", "/etc", "a\\b", "a\x00b", "..", ".", "a\nb", "a\x7fb", "", "   "]
)
def test_a_name_with_path_or_control_characters_is_rejected(name: str) -> None:
    assert "name" in rejected(AddImage, add_image(name=name))


def test_a_name_of_256_characters_is_rejected_and_255_accepted() -> None:
    assert "name" in rejected(AddImage, add_image(name="x" * 256))
    assert validate(AddImage, add_image(name="x" * 255)).name == "x" * 255


@pytest.mark.parametrize("name", ["CentOS 7.9 (x86_64)", "a..b", "образ", "..hidden"])
def test_ordinary_names_are_accepted(name: str) -> None:
    assert validate(AddImage, add_image(name=name)).name == name


@pytest.mark.parametrize("bad", ["A" * 32, "a" * 31, "a" * 33, "g" * 32, "a" * 8 + "-" + "a" * 23])
def test_bad_uuids_are_rejected(bad: str) -> None:
    assert "backupStorageUuids" in rejected(AddImage, add_image(backupStorageUuids=[bad]))
    assert "resourceUuid" in rejected(AddImage, add_image(resourceUuid=bad))


def test_iso_implies_format_iso() -> None:
    image = validate(AddImage, add_image(mediaType="ISO", format=...))
    assert image.format is None
    assert image.effective_format is ImageFormat.iso
    assert validate(AddImage, add_image(mediaType="ISO", format="iso")).effective_format == "iso"


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_an_iso_with_another_format_is_rejected(fmt: str) -> None:
    assert "format" in rejected(AddImage, add_image(mediaType="ISO", format=fmt))


def test_an_iso_cannot_be_a_system_image() -> None:
    assert "system" in rejected(AddImage, add_image(mediaType="ISO", format="iso", system=True))


@pytest.mark.parametrize("media", ["RootVolumeTemplate", "DataVolumeTemplate"])
def test_format_is_required_for_templates(media: str) -> None:
    assert "format" in rejected(AddImage, add_image(mediaType=media, format=...))
    assert "format" in rejected(AddImage, add_image(mediaType=media, format="iso"))


def test_duplicate_backup_storage_uuids_are_rejected() -> None:
    details = rejected(AddImage, add_image(backupStorageUuids=[U1, U2, U1]))
    assert "backupStorageUuids" in details


def test_backup_storage_uuids_must_not_be_empty() -> None:
    assert "backupStorageUuids" in rejected(AddImage, add_image(backupStorageUuids=[]))


def test_md5_is_normalised_to_lowercase() -> None:
    image = validate(AddImage, add_image(md5Sum="D41D8CD98F00B204E9800998ECF8427E"))
    assert image.md5Sum == "d41d8cd98f00b204e9800998ecf8427e"


@pytest.mark.parametrize("md5", ["d41d8cd9", "z" * 32, "d41d8cd98f00b204e9800998ecf8427e0"])
def test_a_bad_md5_is_rejected(md5: str) -> None:
    assert "md5Sum" in rejected(AddImage, add_image(md5Sum=md5))


def test_an_unknown_parameter_is_rejected_by_name() -> None:
    details = rejected(AddImage, add_image(colour="blue"))
    assert details == "colour: unknown parameter"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("system", "true"),
        ("system", 1),
        ("name", 7),
        ("backupStorageUuids", U1),
        ("mediaType", "Iso"),
        ("platform", "linux"),
        ("format", "vmdk"),
        ("type", "vmware"),
        ("description", "d" * 2049),
    ],
)
def test_mistyped_or_out_of_range_values_are_rejected_by_name(field: str, value: Any) -> None:
    assert field in rejected(AddImage, add_image(**{field: value}))


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "http:///nohost",
        "http://example.com/a b",
        "http://example.com/a\r\nHost: evil",
        "http://example.com/a\x00",
        "example.com/a.qcow2",
        "http://",
        "h" * 2049,
    ],
)
def test_malformed_urls_are_rejected(url: str) -> None:
    assert "url" in rejected(AddImage, add_image(url=url))


@pytest.mark.parametrize(
    "url", ["http://h/a", "https://example.com:8443/a?b=c", "sftp://root@host:2222/x.qcow2"]
)
def test_http_https_and_sftp_urls_are_accepted(url: str) -> None:
    assert validate(AddImage, add_image(url=url)).url == url


def test_other_schemes_pass_validation_for_the_handler_to_refuse() -> None:
    # The handler answers URL_NOT_ALLOWED for a well-formed url of another scheme.
    assert validate(AddImage, add_image(url="ftp://example.com/a")).url == "ftp://example.com/a"


@pytest.mark.parametrize("field", ["name", "url", "backupStorageUuids"])
def test_required_parameters_are_named_when_missing(field: str) -> None:
    assert field in rejected(AddImage, add_image(**{field: ...}))


def test_validation_details_name_every_offending_field() -> None:
    details = rejected(AddImage, add_image(name="a/b", system="yes", extra=1))
    assert "name:" in details and "system:" in details and "extra: unknown parameter" in details


def test_validation_details_of_a_nested_field_give_its_path() -> None:
    details = rejected(Query, {"conditions": [{"name": "x", "op": "=", "bogus": 1}]})
    assert "conditions.0.bogus: unknown parameter" in details


def test_update_image_validates_like_add_image() -> None:
    assert "name" in rejected(UpdateImage, {"uuid": U1, "name": "../x"})
    assert validate(UpdateImage, {"uuid": U1, "platform": "Windows"}).platform == "Windows"


@pytest.mark.parametrize(
    ("field", "value"),
    [("limit", -1), ("limit", 2**31), ("start", -1), ("start", 2**31), ("start", 2**63)],
)
def test_query_bounds(field: str, value: int) -> None:
    """Contract section 8: start and limit within 0..2^31-1."""
    assert field in rejected(Query, {field: value})


@pytest.mark.parametrize(
    ("field", "value"), [("limit", 0), ("limit", 2**31 - 1), ("start", 2**31 - 1)]
)
def test_query_bounds_are_inclusive(field: str, value: int) -> None:
    assert getattr(validate(Query, {field: value}), field) == value


def test_at_most_64_conditions() -> None:
    condition = {"name": "name", "op": "=", "value": "x"}
    assert len(validate(Query, {"conditions": [condition] * 64}).conditions) == 64
    assert "conditions" in rejected(Query, {"conditions": [condition] * 65})


# --- the envelope ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"",
        b"\xff\xfe\x00",
        b"[]",
        b'["AddImage", {}]',
        b'"AddImage"',
        b"42",
        b"null",
        b"{}",
        b'{"params": {}}',
        b'{"api": ""}',
        b'{"api": 5, "params": {}}',
        b'{"api": "AddImage", "params": []}',
        b'{"api": "AddImage", "params": null}',
        b'{"api": "AddImage", "params": "name=x"}',
    ],
)
def test_a_body_that_is_not_the_envelope_is_malformed(body: bytes) -> None:
    with pytest.raises(ApiError) as excinfo:
        parse_envelope(body)
    assert excinfo.value.code is ErrorCode.MALFORMED_MESSAGE


def test_a_deeply_nested_body_is_malformed() -> None:
    """JSON nested beyond the parser's recursion limit makes `json.loads` raise RecursionError;
    it is still a bad message and must get a MALFORMED_MESSAGE reply, not escape the handler
    (which would requeue it until the delivery limit, with no reply)."""
    depth = 100_000
    body = b'{"api": "QueryImage", "params": {"x": ' + b"[" * depth + b"]" * depth + b"}}"
    with pytest.raises(ApiError) as excinfo:
        parse_envelope(body)
    assert excinfo.value.code is ErrorCode.MALFORMED_MESSAGE


def test_the_envelope_is_read() -> None:
    envelope = parse_envelope(b'{"api": "QueryImage", "params": {"limit": 1}}')
    assert (envelope.api, envelope.params) == ("QueryImage", {"limit": 1})
    assert parse_envelope(b'{"api": "QueryImage"}').params == {}


def test_missing_api_names_it() -> None:
    with pytest.raises(ApiError) as excinfo:
        parse_envelope(b'{"params": {}}')
    assert "api" in excinfo.value.details
