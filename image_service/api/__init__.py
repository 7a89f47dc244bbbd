"""API handlers: validated parameters in, a reply (or "wait for the agents") out.

A handler runs inside the message's transaction (`pipeline.Ctx`), raises `ApiError` for every
failure a caller may see, and never touches the broker: what it wants published goes to the
outbox. `APIS` is the registry the pipeline dispatches on.
"""

from __future__ import annotations

from image_service import params
from image_service.api.backup_storages import change_backup_storage_state, delete_backup_storage
from image_service.api.config import query_global_config, update_global_config
from image_service.api.creation import add_image
from image_service.api.images import (
    change_image_state,
    delete_image,
    expunge_image,
    get_image_source,
    recover_image,
    sync_image_size,
    update_image,
)
from image_service.api.queries import admit, query_backup_storage, query_image, query_user_tag
from image_service.api.tags import create_user_tag, delete_tag
from image_service.api.templates import (
    create_data_template_from_volume,
    create_root_template_from_snapshot,
    create_root_template_from_volume,
)
from image_service.pipeline import Api

APIS: dict[str, Api] = {
    "AddImage": Api(params.AddImage, add_image),
    "DeleteImage": Api(params.DeleteImage, delete_image),
    "ChangeImageState": Api(params.ChangeImageState, change_image_state),
    "UpdateImage": Api(params.UpdateImage, update_image),
    "QueryImage": Api(params.Query, query_image, read_only=True, admit=admit),
    "GetImageSource": Api(params.GetImageSource, get_image_source),
    "CreateRootVolumeTemplateFromRootVolume": Api(
        params.CreateRootVolumeTemplateFromRootVolume, create_root_template_from_volume
    ),
    "CreateRootVolumeTemplateFromVolumeSnapshot": Api(
        params.CreateRootVolumeTemplateFromVolumeSnapshot, create_root_template_from_snapshot
    ),
    "CreateDataVolumeTemplateFromVolume": Api(
        params.CreateDataVolumeTemplateFromVolume, create_data_template_from_volume
    ),
    "QueryBackupStorage": Api(params.Query, query_backup_storage, read_only=True, admit=admit),
    "ChangeBackupStorageState": Api(params.ChangeBackupStorageState, change_backup_storage_state),
    "DeleteBackupStorage": Api(params.DeleteBackupStorage, delete_backup_storage),
    "CreateUserTag": Api(params.CreateUserTag, create_user_tag),
    "DeleteTag": Api(params.DeleteTag, delete_tag),
    "QueryUserTag": Api(params.Query, query_user_tag, read_only=True, admit=admit),
    "ExpungeImage": Api(params.ExpungeImage, expunge_image),
    "RecoverImage": Api(params.RecoverImage, recover_image),
    "SyncImageSize": Api(params.SyncImageSize, sync_image_size),
    "QueryGlobalConfig": Api(params.Query, query_global_config, read_only=True, admit=admit),
    "UpdateGlobalConfig": Api(params.UpdateGlobalConfig, update_global_config),
}
